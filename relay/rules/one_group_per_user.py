"""`one_group_per_user`: remember each user's current group and put it on their events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from relay.options.fields import FieldError
from relay.pipeline import TYPES, Message, identity
from relay.pipeline.runner import Drop, RuleContext
from relay.state.model import State, anon_ref, user_ref


@dataclass(frozen=True)
class OneGroupPerUser:
    """A group call sets the user's current group (the latest event time wins); messages of the
    types in `inject_into` without `context.groupId` get it; alias carries it to the new id."""

    reads_state: ClassVar[bool] = True  # its state is loaded before the rules

    inject_into: tuple[str, ...] = ("track", "page", "screen")

    def __post_init__(self) -> None:
        unknown = [t for t in self.inject_into if t not in TYPES - {"group", "alias"}]
        if unknown:
            raise FieldError("inject_into", f"{unknown[0]!r} is not one of identify, track, "
                                            "page, screen")

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        kind = message.get("type")
        if kind == "group":
            self._remember(message, ctx.state)
            return message
        if kind == "alias":
            self._carry(message, ctx.state)
            return message
        if kind not in self.inject_into:
            return message
        context = message.get("context")
        if isinstance(context, dict) and identity.text_id(context.get("groupId")) is not None:
            return message
        ref, group = identity.ref_and_group(message, ctx.state)
        if kind == "track" and ref is not None:
            ctx.state.note_ungrouped_track(ref)
        return message if group is None else _injected(message, context, group)

    def _remember(self, message: Message, state: State) -> None:
        ref = identity.primary_ref(message)
        group_id = identity.text_id(message.get("groupId"))
        if ref is None or group_id is None:
            return
        state.set_group(ref, group_id, identity.event_time(message))
        state.note_member(ref, group_id)

    def _carry(self, message: Message, state: State) -> None:
        user_id = identity.text_id(message.get("userId"))
        previous = identity.text_id(message.get("previousId"))
        if user_id is None or previous is None or state.group(user_ref(user_id)) is not None:
            return
        for ref in (user_ref(previous), anon_ref(previous)):
            membership = state.group(ref)
            if membership is not None:
                state.set_group(user_ref(user_id), membership.group_id, membership.at)
                return


def _injected(message: Message, context: Any, group: str) -> Message:
    return {**message, "context": {**(context if isinstance(context, dict) else {}),
                                   "groupId": group}}
