"""What the SDK connection reads of a request before it refuses it: its head, its body on the
wire, and the chunks a body may come in."""

from __future__ import annotations

from relay.ingest import segment

MAX_URL = 8 * 1024
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
# llhttp is fed at most this much at a time, so that what the limits below count is never off by
# more than one piece (and aiohttp, after a handover, is given pieces no bigger).
PIECE = 64 * 1024
# httptools gathers a header's value until it ends before passing it on, so MAX_HEAD alone would
# let one endless value grow in memory: the bytes a head takes on the wire are bounded too.
MAX_HEAD_WIRE = MAX_URL + MAX_HEAD + PIECE + 4 * 1024
# A body's bytes on the wire: the body itself, its chunks' framing and extensions (which llhttp
# skips without a callback), and at most one piece of what follows it.
MAX_BODY_WIRE = segment.MAX_REQUEST_BYTES + 2 * PIECE
# Each chunk costs three calls into Python; a body in 1-byte chunks would cost ~20,000 times a
# plain body's CPU. Beyond FREE_CHUNKS, chunks must carry MIN_CHUNK bytes each on average.
FREE_CHUNKS = 16
MIN_CHUNK = 256
VERSIONS = ("1.0", "1.1")

