"""The `rules:` list of the config as pipeline steps: type, id and `when:` of each, checked."""

from __future__ import annotations

from typing import Any

from relay.options import fields
from relay.options.yaml_source import Path, Source
from relay.pipeline.condition import compile_when
from relay.pipeline.runner import Rule, Step
from relay.rules import REGISTRY, DropInternalUsers, OneGroupPerUser

COMMON = ("type", "id", "when")


def build(items: Any, source: Source) -> tuple[Step, ...]:
    """Every rule of `items`, in order; problems are recorded in `source`."""
    if not isinstance(items, list):
        source.error(("rules",), "must be a list of rules")
        return ()
    steps: list[Step] = []
    ids: set[str] = set()
    for i, item in enumerate(items):
        step = _step(i, item, ("rules", i), source)
        if step is None:
            continue
        if step.id in ids:
            source.error(("rules", i, "id"), f"another rule has the id {step.id!r}")
        ids.add(step.id)
        steps.append(step)
    return tuple(steps)


def _step(index: int, item: Any, path: Path, source: Source) -> Step | None:
    kind = item.get("type") if isinstance(item, dict) else None
    if not isinstance(kind, str):
        source.error(path, "each rule needs a 'type': one of " + ", ".join(sorted(REGISTRY)))
        return None
    cls = REGISTRY.get(kind)
    if cls is None:
        source.error((*path, "type"), f"unknown rule type {kind!r}{fields.suggest(kind, REGISTRY)}")
        return None
    rule_id = item.get("id", f"{kind}#{index}")
    if not isinstance(rule_id, str) or not rule_id:
        source.error((*path, "id"), f"must be a non-empty string; got {rule_id!r}")
    when = compile_when(item["when"], (*path, "when"), source) if "when" in item else None
    if getattr(cls, "needs_when", False) and "when" not in item:
        source.error(path, f"a '{kind}' rule needs a 'when:' saying which messages it applies to")
    rule: Rule = fields.build(cls, item, path, source, skip=COMMON)
    return Step(id=str(rule_id), rule=rule, when=when)


def warnings(steps: tuple[Step, ...], source: Source) -> tuple[str, ...]:
    """Rules that load fine but do not do what their author most likely wants."""
    return _order(steps, source) + _placeholders(steps, source)


def _order(steps: tuple[Step, ...], source: Source) -> tuple[str, ...]:
    order: list[type] = [type(step.rule) for step in steps]
    grouped, internal = OneGroupPerUser, DropInternalUsers
    if grouped in order and internal in order and order.index(internal) < order.index(grouped):
        path = ("rules", order.index(internal))
        return (
            f"{source.file}:{source.line(path)}: rules[{path[1]}]: warning: drop_internal_users"
            " runs before one_group_per_user, so a staff member's group call is dropped before it"
            " is remembered and their later track calls in a customer's account (no email, no"
            " groupId) are not recognised; put one_group_per_user first",
        )
    return ()


def placeholder(domain: str) -> bool:
    """A domain that stands for the reader's own, as examples write it: nobody's staff is there."""
    domain = domain.lower().strip(".")
    return (domain.startswith(("your.", "yourcompany.", "your-company.")) or domain
            in ("example.com", "example.org", "example.net") or domain.endswith(".example"))


def _placeholders(steps: tuple[Step, ...], source: Source) -> tuple[str, ...]:
    notes = []
    for i, step in enumerate(steps):
        if isinstance(step.rule, DropInternalUsers):
            for domain in filter(placeholder, step.rule.email_domains):
                path = ("rules", i, "email_domains")
                notes.append(
                    f"{source.file}:{source.line(path)}: rules[{i}].email_domains: warning:"
                    f" {domain!r} is a placeholder, so no staff member is recognised by email;"
                    " set it to your company's email domain (the shipped config reads"
                    " RELAY_STAFF_DOMAIN)")
    return tuple(notes)
