"""Runs the configured rules over each message, in order, and records what each one did."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

Message = dict[str, Any]

log = logging.getLogger("relay.pipeline")


@dataclass(frozen=True)
class Drop:
    """A rule's verdict that a message must not be forwarded, and why."""

    reason: str


@dataclass
class RuleContext:
    """What a rule may consult besides the message; state arrives here, never as a global."""

    route: str = ""


class Rule(Protocol):
    """The contract every rule meets: a frozen dataclass built once from its YAML options."""

    async def apply(self, message: Message, ctx: RuleContext) -> Message | Drop: ...


@dataclass(frozen=True)
class Step:
    """One configured rule with its id (`type#index` unless the YAML names it)."""

    id: str
    rule: Rule


@dataclass
class Outcome:
    """One message after the pipeline: the final message, or the drop, and every rule's effect."""

    message: Message | None
    dropped_by: str | None = None
    reason: str | None = None
    changed_by: list[str] = field(default_factory=list)


class Pipeline:
    """The rules of one config, applied in YAML order."""

    def __init__(self, steps: Sequence[Step]) -> None:
        self.steps = tuple(steps)

    async def run(self, message: Message, ctx: RuleContext) -> Outcome:
        """Every step over `message`; a rule that raises is logged and skipped, never fatal."""
        outcome = Outcome(message=message)
        for step in self.steps:
            before = copy.deepcopy(message)
            try:
                result = await step.rule.apply(message, ctx)
            except Exception:
                log.exception("rule %s failed; message %s passed on unchanged", step.id,
                              before.get("messageId"))
                message = before
                continue
            if isinstance(result, Drop):
                return Outcome(None, step.id, result.reason, outcome.changed_by)
            if result != before:
                outcome.changed_by.append(step.id)
            message = result
        outcome.message = message
        return outcome
