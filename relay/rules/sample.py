"""`sample`: keep a deterministic fraction of users."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from relay.options.fields import FieldError
from relay.pipeline import Message, identity
from relay.pipeline.runner import Drop, RuleContext


@dataclass(frozen=True)
class Sample:
    """Keeps the messages of a `rate` fraction of users, chosen by a hash of their userId (else
    anonymousId), so a user is always all in or all out; `salt` picks another such set."""

    rate: float
    salt: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise FieldError("rate", f"must be between 0 and 1; got {self.rate}")

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        ref = identity.primary_ref(message)
        if ref is None:
            return message
        digest = hashlib.sha256(f"{self.salt}\n{ref}".encode("utf-8", "surrogatepass")).digest()
        # Integers, so that rate 1 keeps every user (a float share can round up to 1.0).
        keep = int.from_bytes(digest[:8], "big") < round(self.rate * 2**64)
        return message if keep else Drop("sampled_out")
