"""`drop_internal_users`: drop staff traffic, remembered across events, except in own groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from relay.options.fields import FieldError
from relay.pipeline import Message, identity
from relay.pipeline.runner import Drop, RuleContext
from relay.state.model import State


@dataclass(frozen=True)
class DropInternalUsers:
    """A user is internal when listed in `user_ids` or seen with an email at one of
    `email_domains` (or a subdomain); the verdict is remembered for their userId and linked
    anonymousIds. Their messages are dropped unless they act in one of `own_groups`.

    An anonymousId is linked to the userId it comes with on any message (and an alias links its
    previousId): whatever order a user's calls arrive in, the same ids end up internal, which
    is what lets several relays end where one would."""

    reads_state: ClassVar[bool] = True  # its state is loaded before the rules

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

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        refs = identity.refs(message)
        if not refs:
            return message
        state = ctx.state
        self._link(message, state)
        reason = self._verdict(message, identity.text_id(message.get("userId")))
        if reason is None and any(state.is_internal(ref) for ref in refs):
            reason = "linked"  # e.g. an alias from an internal userId to a new one
        if reason is None:
            return message
        state.mark_internal(refs, reason)
        group = _acting_group(message, state)
        if group is not None and group in self.own_groups:
            return message
        return Drop("internal_user")

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

    def _link(self, message: Message, state: State) -> None:
        user_id = identity.text_id(message.get("userId"))
        key = "previousId" if message.get("type") == "alias" else "anonymousId"
        other = identity.text_id(message.get(key))
        if user_id is not None and other is not None:
            state.link(other, user_id)


def _acting_group(message: Message, state: State) -> str | None:
    """The group the message acts in: a group call's groupId, context.groupId, else current."""
    if message.get("type") == "group":
        return identity.text_id(message.get("groupId"))
    context = message.get("context")
    if isinstance(context, dict):
        explicit = identity.text_id(context.get("groupId"))
        if explicit is not None:
            return explicit
    return identity.current_group(message, state)
