"""Runs the configured rules over each message, in order, and records what each one did."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from relay.condition import Condition
    from relay.state import State

Message = dict[str, Any]

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


class Later(Enum):
    """A rule's `apply_now` answer when it cannot decide without awaiting `apply`."""

    LATER = "later"


LATER = Later.LATER


class Rule(Protocol):
    """The contract every rule meets: a frozen dataclass built once from its YAML options.

    `apply` never changes the message it is given: it returns that same object when it changes
    nothing, else a new one (see `relay.paths`), or a Drop.
    """

    async def apply(self, message: Message, ctx: RuleContext) -> Message | Drop: ...


class QuickRule(Rule, Protocol):
    """A rule that can also answer without a coroutine, which costs more than most rules' work.

    `apply_now` gives what `apply` would, with the same effect on state, or LATER having changed
    nothing (for instance when the state it needs is not in memory); the pipeline then awaits
    `apply`. Rules without it are always awaited.
    """

    def apply_now(self, message: Message, ctx: RuleContext) -> Message | Drop | Later: ...


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


@dataclass
class Outcome:
    """One message after the pipeline: the final message or the drop, and every rule's effect."""

    message: Message | None
    dropped_by: str | None = None
    reason: str | None = None
    changed_by: list[str] = field(default_factory=list)
    effects: list[Effect] = field(default_factory=list)


Now = Callable[[Message, RuleContext], "Message | Drop | Later"]


@dataclass(frozen=True)
class _Planned:
    """A step as run: its `when:` test and its rule's `apply_now` looked up once, not per
    message."""

    id: str
    rule: Rule
    when: Callable[[Message], bool] | None
    now: Now | None


class Pipeline:
    """The rules of one config, applied in YAML order."""

    def __init__(self, steps: Sequence[Step], on_error: Literal["pass", "drop"] = "pass") -> None:
        self.steps = tuple(steps)
        self.on_error = on_error
        self._plan = tuple(
            _Planned(step.id, step.rule, step.when.test if step.when is not None else None,
                     getattr(step.rule, "apply_now", None))
            for step in self.steps)

    async def run(self, message: Message, ctx: RuleContext, trace: bool = False) -> Outcome:
        """Every step over `message`; a rule that raises is logged, never fatal to ingest."""
        outcome = Outcome(message=None)
        for step in self._plan:
            if step.when is not None and not step.when(message):
                continue
            try:
                result = step.now(message, ctx) if step.now is not None else LATER
                if result is LATER:
                    result = await step.rule.apply(message, ctx)
            except Exception as exc:
                log.exception("rule %s failed on message %s; on_rule_error: %s", step.id,
                              message.get("messageId"), self.on_error)
                if trace:
                    outcome.effects.append(Effect(step.id, message, message, error=repr(exc)))
                if self.on_error == "drop":
                    return _dropped(outcome, step.id, "rule_error")
                continue
            if isinstance(result, Drop):
                if trace:
                    outcome.effects.append(Effect(step.id, message, None, result.reason))
                return _dropped(outcome, step.id, result.reason)
            if result is not message:
                outcome.changed_by.append(step.id)
                if trace:
                    outcome.effects.append(Effect(step.id, message, result))
            message = result
        outcome.message = message
        return outcome


def _dropped(outcome: Outcome, step: str, reason: str) -> Outcome:
    outcome.dropped_by = step
    outcome.reason = reason
    return outcome
