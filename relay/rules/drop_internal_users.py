"""`drop_internal_users`: drop staff traffic, remembered across events, except in own groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.options.fields import FieldError
from relay.pipeline import Message, identity
from relay.pipeline.runner import LATER, Drop, Later, RuleContext
from relay.rules.one_group_per_user import current_group
from relay.state.sqlite import State, anon_ref, user_ref


@dataclass(frozen=True)
class DropInternalUsers:
    """A user is internal when listed in `user_ids` or seen with an email at one of
    `email_domains` (or a subdomain); the verdict is remembered for their userId and linked
    anonymousIds. Their messages are dropped unless they act in one of `own_groups`.

    An anonymousId is linked to the userId it comes with on any message (and an alias links its
    previousId): whatever order a user's calls arrive in, the same ids end up internal, which
    is what lets several relays end where one would."""

    email_domains: tuple[str, ...] = ()
    user_ids: tuple[str, ...] = ()
    own_groups: tuple[str, ...] = ()
    _domains: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        domains = tuple(d.strip().lstrip("@").lower() for d in self.email_domains)
        for domain in domains:
            if not domain or "@" in domain or " " in domain or domain.startswith("."):
                raise FieldError("email_domains", f"{domain!r} is not a domain like example.com")
        if not domains and not self.user_ids:
            raise FieldError("email_domains", "give email_domains or user_ids (or both)")
        object.__setattr__(self, "_domains", domains)

    async def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        refs = identity.refs(message)
        if not refs:
            return message
        await self._link(message, ctx.state)
        reason = self._verdict(message, identity.text_id(message.get("userId")))
        if reason is None and await _any_internal(refs, ctx.state):
            reason = "linked"  # e.g. an alias from an internal userId to a new one
        if reason is None:
            return message
        await ctx.state.mark_internal(refs, reason)
        group = await _acting_group(message, ctx.state)
        if group is not None and group in self.own_groups:
            return message
        return Drop("internal_user")

    def apply_now(self, message: Message, ctx: RuleContext) -> Message | Drop | Later:
        """`apply` for the usual message: one that shows no staff, from users whose verdicts are
        in memory and all external. Everything else (marking, acting groups) is LATER.

        An alias is LATER too: its refs go beyond the two ids it links, so a verdict could be
        missing after the link was made, and LATER must come before any change."""
        kind = message.get("type")
        if kind == "alias":
            return LATER
        # identity.refs(message), for a message that is not an alias, with each id read once
        user_id = identity.text_id(message.get("userId"))
        anonymous_id = identity.text_id(message.get("anonymousId"))
        if user_id is None and anonymous_id is None:
            return message
        if self._verdict(message, user_id) is not None:
            return LATER
        state = ctx.state
        if user_id is not None and anonymous_id is not None \
                and not state.link_now(anonymous_id, user_id):
            return LATER
        refs = [user_ref(user_id)] if user_id is not None else []
        if anonymous_id is not None:
            refs.append(anon_ref(anonymous_id))
        return message if state.any_internal_now(refs) is False else LATER

    def _verdict(self, message: Message, user_id: str | None) -> str | None:
        """Why this message alone shows its user is internal, or None; `user_id` is its
        userId as text."""
        if user_id is not None and user_id in self.user_ids:
            return "user_id"
        for email in identity.emails(message):
            domain = email.rsplit("@", 1)[1].strip().lower()
            if any(domain == d or domain.endswith("." + d) for d in self._domains):
                return "email_domain"
        return None

    async def _link(self, message: Message, state: State) -> None:
        user_id = identity.text_id(message.get("userId"))
        key = "previousId" if message.get("type") == "alias" else "anonymousId"
        other = identity.text_id(message.get(key))
        if user_id is not None and other is not None:
            await state.link(other, user_id)


async def _any_internal(refs: list[str], state: State) -> bool:
    for ref in refs:
        if await state.is_internal(ref):
            return True
    return False


async def _acting_group(message: Message, state: State) -> str | None:
    """The group the message acts in: a group call's groupId, context.groupId, else current."""
    if message.get("type") == "group":
        return identity.text_id(message.get("groupId"))
    context = message.get("context")
    if isinstance(context, dict):
        explicit = identity.text_id(context.get("groupId"))
        if explicit is not None:
            return explicit
    return await current_group(message, state)
