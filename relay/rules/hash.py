"""`hash`: pseudonymise fields with HMAC-SHA256 under a key from the environment."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import ClassVar

from relay.options.fields import FieldError
from relay.pipeline import Message, dotted
from relay.pipeline.runner import Drop, RuleContext

_ABSENT = object()


@dataclass(frozen=True)
class Hash:
    """Replaces each of `paths` by the hex HMAC-SHA256 of its value, keyed by the environment
    variable named in `key_env`; the same value always hashes the same, so joins still work."""

    # The tap shows the message as received through `masked`, so that what this rule replaces
    # is never shown in clear, whatever became of the message.
    masks_values: ClassVar[bool] = True

    paths: tuple[str, ...]
    key_env: str = "RELAY_HASH_KEY"
    _parts: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    _key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.paths or not all(dotted.valid(p) for p in self.paths):
            raise FieldError("paths", "must list dotted paths like traits.email")
        key = os.environ.get(self.key_env, "")
        if len(key) < 16:
            raise FieldError("key_env", f"environment variable {self.key_env} must hold a secret"
                                        " of at least 16 characters")
        object.__setattr__(self, "_parts", tuple(dotted.split(p) for p in self.paths))
        object.__setattr__(self, "_key", key.encode())

    def apply(self, message: Message, ctx: RuleContext) -> Message | Drop:
        return self.masked(message)

    def masked(self, message: Message) -> Message:
        """`message` with each of `paths` replaced by its hash."""
        for parts in self._parts:
            value = dotted.get(message, parts, _ABSENT)
            if value is _ABSENT or value is None:
                continue
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            digest = hmac.new(self._key, text.encode("utf-8", "surrogatepass"), hashlib.sha256)
            message = dotted.replaced(message, parts, digest.hexdigest())
        return message
