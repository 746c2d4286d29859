"""Running the rules: the pipeline over a message (`runner`), `when:` conditions, dotted paths
into a message, and who a message is about (`identity`). Rules read and write user state through
`relay.state`; the pipeline's result goes back to `relay.ingest`, which stores it.
"""

from typing import Any

# One message of the Segment protocol as parsed JSON: what the HTTP edge's requests are made of,
# what each rule takes and gives, and what is stored. Defined here, at the stage every other one
# can import, once.
Message = dict[str, Any]
# The message types of the protocol.
TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
