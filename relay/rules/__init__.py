"""The rules relay knows, by their YAML `type`: registered here explicitly, one module each."""

from __future__ import annotations

from relay.rules.remove import Remove
from relay.rules.set import SetField

REGISTRY: dict[str, type] = {
    "remove": Remove,
    "set": SetField,
}
