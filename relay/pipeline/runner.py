"""Runs the configured rules over each message, in order, and records what each one did."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from relay.pipeline import Message, identity

if TYPE_CHECKING:
    from relay.pipeline.condition import Condition
    from relay.state.model import State


log = logging.getLogger("relay.pipeline")


@dataclass(frozen=True)
class Drop:
    """A rule's verdict that a message must not be forwarded, and why."""

    reason: str


@dataclass
class RuleContext:
    """What a rule may consult besides the message; state arrives here, never as a global."""

    state: State
    route: str = ""


class Rule(Protocol):
    """The contract every rule meets: a frozen dataclass built once from its YAML options, and
    one synchronous `apply` over the message and the user state in memory (`State.load` has
    brought in what it may read). `apply` never changes the message it is given: it returns
    that same object when it changes nothing, else a new one (see `relay.pipeline.dotted`), or
    a Drop.
    """

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop: ...


def reads_state(rule: Rule) -> bool:
    """Whether `rule` reads user state (it says so with a class attribute `reads_state`): only
    then is a request's state loaded before its rules."""
    return bool(getattr(rule, "reads_state", False))


@dataclass(frozen=True)
class Step:
    """One configured rule: its id (`type#index` unless the YAML names it) and `when:`."""

    id: str
    rule: Rule
    when: Condition | None = None


@dataclass
class Effect:
    """What one rule did to one message, for `relay try`."""

    step: str
    before: Message
    after: Message | None
    reason: str | None = None
    error: str | None = None


# Shared by every Outcome until a rule changes its message (most never are): two lists fewer to
# make per message. Only `Outcome.changed` and `Outcome.effected` add to an Outcome's own.
_UNCHANGED: list[str] = []
_NO_EFFECTS: list[Effect] = []


class Outcome:
    """One message after the pipeline: the final message or the drop, and every rule's effect.
    (A class of its own rather than a dataclass, which would not share the empty lists; one is
    made per message, and slots make it half as slow to build.)"""

    __slots__ = ("changed_by", "dropped_by", "effects", "message", "reason")

    def __init__(self, message: Message | None, dropped_by: str | None = None,
                 reason: str | None = None, changed_by: list[str] | None = None,
                 effects: list[Effect] | None = None) -> None:
        self.message = message
        self.dropped_by = dropped_by
        self.reason = reason
        self.changed_by = _UNCHANGED if changed_by is None else changed_by
        self.effects = _NO_EFFECTS if effects is None else effects

    def __repr__(self) -> str:
        return (f"Outcome(message={self.message!r}, dropped_by={self.dropped_by!r}, "
                f"reason={self.reason!r}, changed_by={self.changed_by!r})")

    def changed(self, step: str) -> None:
        if self.changed_by is _UNCHANGED:
            self.changed_by = [step]
        else:
            self.changed_by.append(step)

    def effected(self, effect: Effect) -> None:
        if self.effects is _NO_EFFECTS:
            self.effects = [effect]
        else:
            self.effects.append(effect)


Apply = Callable[[Message, RuleContext], "Message | Drop"]


class Pipeline:
    """The rules of one config, applied in YAML order."""

    def __init__(self, steps: Sequence[Step], on_error: Literal["pass", "drop"] = "pass") -> None:
        self.steps = tuple(steps)
        self.on_error = on_error
        # Each step's `when:` test and `apply` looked up once, as plain tuples: unpacked into
        # locals, they are read faster than fields, once per message and step.
        self._plan: tuple[tuple[str, Callable[[Message], bool] | None, Apply], ...] = tuple(
            (step.id, step.when.test if step.when is not None else None, step.rule.apply)
            for step in self.steps)
        self.reads_state = any(reads_state(step.rule) for step in self.steps)

    async def run(self, message: Message, ctx: RuleContext, trace: bool = False) -> Outcome:
        """Every step over one `message`, its users' state loaded first (a request's messages
        are loaded together, then each `start`ed)."""
        try:
            if self.reads_state:
                await ctx.state.load(identity.refs(message))
            started = self.start(message, ctx, trace)
        finally:
            ctx.state.settle()
        return started if isinstance(started, Outcome) else Outcome(started)

    def start(self, message: Message, ctx: RuleContext, trace: bool = False) -> Message | Outcome:
        """Every step over `message`, whose users' state is in memory: the message itself when
        every rule left it as it was (most messages: no Outcome to make), else the Outcome of
        the rules that changed, dropped or failed on it. A rule that raises is logged, never
        fatal to ingest."""
        outcome = None
        for step_id, when, apply in self._plan:
            if when is not None and not when(message):
                continue
            try:
                result = apply(message, ctx)
            except Exception as exc:
                outcome = outcome or Outcome(None)
                if self._failed(outcome, step_id, message, exc, trace):
                    return outcome
                continue
            if result is not message:  # most rules leave most messages alone: nothing to record
                outcome = outcome or Outcome(None)
                after = self._settle(outcome, step_id, message, result, trace)
                if after is None:
                    return outcome
                message = after
        if outcome is None:
            return message
        outcome.message = message
        return outcome

    def _failed(self, outcome: Outcome, step: str, message: Message, exc: Exception,
                trace: bool) -> bool:
        """Logs a rule that raised; True when on_rule_error drops the message."""
        log.exception("rule %s failed on message %s; on_rule_error: %s", step,
                      message.get("messageId"), self.on_error, exc_info=exc)
        if trace:
            outcome.effected(Effect(step, message, message, error=repr(exc)))
        if self.on_error == "drop":
            _dropped(outcome, step, "rule_error")
            return True
        return False

    @staticmethod
    def _settle(outcome: Outcome, step: str, message: Message, result: Message | Drop,
                trace: bool) -> Message | None:
        """Records what a rule did to a message it changed or dropped; the message to go on
        with, or None once dropped."""
        if isinstance(result, Drop):
            if trace:
                outcome.effected(Effect(step, message, None, result.reason))
            _dropped(outcome, step, result.reason)
            return None
        outcome.changed(step)
        if trace:
            outcome.effected(Effect(step, message, result))
        return result


def _dropped(outcome: Outcome, step: str, reason: str) -> Outcome:
    outcome.dropped_by = step
    outcome.reason = reason
    return outcome
