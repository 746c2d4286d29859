"""Before a request's rules run with a shared store: what it holds about the request's users is
fetched, and, under `state.on_unavailable: hold`, the messages that cannot be decided yet are
held.

Under `decide` (the default) the rules run at once on what this relay knows when Redis does not
answer. Under `hold`, a message with a user is stored with its rules still to run, and run
through them once Redis answers again (`relay.ingest.release`), so that no staff member's event
leaks
while the relays cannot know who is staff. A user with messages held has each later message held
behind them, so that their order is kept.
"""

from __future__ import annotations

from relay.ingest import segment
from relay.metrics import Metrics
from relay.pipeline import Message, identity
from relay.state.model import user_ref
from relay.state.shared import SharedState

Ready = list[tuple[Message, str | None]]


async def fetched(shared: SharedState, ready: Ready, flat: list[str], *, key: str, route: str,
                  metrics: Metrics) -> Ready:
    """`ready`'s messages whose rules may run now, once what the store holds about their users
    (`flat`: `request_refs(ready)`) is fetched in one call; the others are held (their rows
    ride in the request's commit)."""
    answered = not flat or await shared.prefetch(flat)
    if not shared.hold or (answered and not shared.held_refs):
        if not answered:
            metrics.without_store.labels("decided").inc(len(ready))
        return ready
    refs_of = [identity.refs(message) for message, _ in ready]
    now: Ready = []
    for (message, sent), refs in zip(ready, refs_of, strict=True):
        if refs and (not answered or not shared.held_refs.isdisjoint(refs)):
            shared.hold_message(key, route, refs, sent or segment.dumps(message))
        else:
            now.append((message, sent))
    if len(now) < len(ready):
        metrics.without_store.labels("held").inc(len(ready) - len(now))
    return now


def request_refs(ready: Ready) -> list[str]:
    """Every ref of `ready`'s messages. A message with a userId alone (most of them) is read
    here without `identity.refs`'s calls: that pass cost ~1 µs a message of the main thread."""
    out: list[str] = []
    for message, _ in ready:
        user_id = message.get("userId")
        if user_id.__class__ is str and user_id and "anonymousId" not in message \
                and "previousId" not in message:
            out.append(user_ref(user_id))
        else:
            out += identity.refs(message)
    return out
