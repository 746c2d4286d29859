"""`one_group_per_user`: remember each user's current group and put it on their events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.options.fields import FieldError
from relay.pipeline import TYPES, Message, identity
from relay.pipeline.runner import LATER, Drop, Later, RuleContext
from relay.state.sqlite import MISSING, Missing, State, anon_ref, user_ref


@dataclass(frozen=True)
class OneGroupPerUser:
    """A group call sets the user's current group (the latest event time wins); messages of the
    types in `inject_into` without `context.groupId` get it; alias carries it to the new id."""

    inject_into: tuple[str, ...] = ("track", "page", "screen")

    def __post_init__(self) -> None:
        unknown = [t for t in self.inject_into if t not in TYPES - {"group", "alias"}]
        if unknown:
            raise FieldError("inject_into", f"{unknown[0]!r} is not one of identify, track, "
                                            "page, screen")

    async def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        kind = message.get("type")
        if kind == "group":
            await self._remember(message, ctx.state)
            return message
        if kind == "alias":
            await self._carry(message, ctx.state)
            return message
        if kind not in self.inject_into:
            return message
        context = message.get("context")
        if isinstance(context, dict) and identity.text_id(context.get("groupId")) is not None:
            return message
        ref = identity.primary_ref(message)
        if kind == "track" and ref is not None:
            ctx.state.note_ungrouped_track(ref)
        group = await current_group(message, ctx.state)
        if group is None:
            return message
        return _injected(message, context, group)

    def apply_now(self, message: Message, ctx: RuleContext) -> Message | Drop | Later:
        """`apply` when the groups it reads are in memory; every state read comes before the
        first write, so LATER leaves nothing half done."""
        kind = message.get("type")
        if kind == "group":
            return message if self._remember_now(message, ctx.state) else LATER
        if kind == "alias":
            return message if self._carry_now(message, ctx.state) else LATER
        if kind not in self.inject_into:
            return message
        context = message.get("context")
        if isinstance(context, dict) and identity.text_id(context.get("groupId")) is not None:
            return message
        found = _ref_and_group_now(message, ctx.state)
        if found is MISSING:
            return LATER
        ref, group = found
        if kind == "track" and ref is not None:
            ctx.state.note_ungrouped_track(ref)  # after the read, unlike apply: they are apart
        return message if group is None else _injected(message, context, group)

    async def _remember(self, message: Message, state: State) -> None:
        ref = identity.primary_ref(message)
        group_id = identity.text_id(message.get("groupId"))
        if ref is None or group_id is None:
            return
        await state.set_group(ref, group_id, identity.event_time(message))
        state.note_member(ref, group_id)

    def _remember_now(self, message: Message, state: State) -> bool:
        ref = identity.primary_ref(message)
        group_id = identity.text_id(message.get("groupId"))
        if ref is None or group_id is None:
            return True
        if state.set_group_now(ref, group_id, identity.event_time(message)) is MISSING:
            return False
        state.note_member(ref, group_id)
        return True

    async def _carry(self, message: Message, state: State) -> None:
        user_id = identity.text_id(message.get("userId"))
        previous = identity.text_id(message.get("previousId"))
        if user_id is None or previous is None or await state.group(user_ref(user_id)):
            return
        for ref in (user_ref(previous), anon_ref(previous)):
            membership = await state.group(ref)
            if membership is not None:
                await state.set_group(user_ref(user_id), membership.group_id, membership.at)
                return

    def _carry_now(self, message: Message, state: State) -> bool:
        user_id = identity.text_id(message.get("userId"))
        previous = identity.text_id(message.get("previousId"))
        if user_id is None or previous is None:
            return True
        own = state.group_now(user_ref(user_id))
        if own is MISSING:
            return False
        if own is not None:
            return True
        for ref in (user_ref(previous), anon_ref(previous)):
            membership = state.group_now(ref)
            if membership is MISSING:
                return False
            if membership is not None:
                done = state.set_group_now(user_ref(user_id), membership.group_id, membership.at)
                return done is not MISSING
        return True


def _injected(message: Message, context: Any, group: str) -> Message:
    return {**message, "context": {**(context if isinstance(context, dict) else {}),
                                   "groupId": group}}


async def current_group(message: Message, state: State) -> str | None:
    """The group the message's user is in now: by userId, else by anonymousId."""
    for key, make in (("userId", user_ref), ("anonymousId", anon_ref)):
        value = identity.text_id(message.get(key))
        if value is not None:
            membership = await state.group(make(value))
            if membership is not None:
                return membership.group_id
    return None


def _ref_and_group_now(message: Message,
                       state: State) -> tuple[str | None, str | None] | Missing:
    """`identity.primary_ref` and, from memory (or MISSING), `current_group` at once, each id
    read and made a ref once: what every ungrouped track needs."""
    user_id = identity.text_id(message.get("userId"))
    ref = None
    if user_id is not None:
        ref = user_ref(user_id)
        membership = state.group_now(ref)
        if membership is MISSING:
            return MISSING
        if membership is not None:
            return ref, membership.group_id
    anonymous_id = identity.text_id(message.get("anonymousId"))
    if anonymous_id is None:
        return ref, None
    anonymous = anon_ref(anonymous_id)
    membership = state.group_now(anonymous)
    if membership is MISSING:
        return MISSING
    return ref or anonymous, None if membership is None else membership.group_id
