"""The rules relay knows, by their YAML `type`: registered here explicitly, one module each."""

from __future__ import annotations

from relay.rules.allow_properties import AllowProperties
from relay.rules.drop import DropMatching
from relay.rules.drop_internal_users import DropInternalUsers
from relay.rules.hash import Hash
from relay.rules.normalize_traits import NormalizeTraits
from relay.rules.one_group_per_user import OneGroupPerUser
from relay.rules.remove import Remove
from relay.rules.rename import Rename
from relay.rules.rename_event import RenameEvent
from relay.rules.sample import Sample
from relay.rules.set import SetField

__all__ = ["REGISTRY", "DropInternalUsers", "OneGroupPerUser"]

REGISTRY: dict[str, type] = {
    "allow_properties": AllowProperties,
    "drop": DropMatching,
    "drop_internal_users": DropInternalUsers,
    "hash": Hash,
    "normalize_traits": NormalizeTraits,
    "one_group_per_user": OneGroupPerUser,
    "remove": Remove,
    "rename": Rename,
    "rename_event": RenameEvent,
    "sample": Sample,
    "set": SetField,
}
