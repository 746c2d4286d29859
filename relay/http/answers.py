"""An answer's status line and headers as bytes, for relay's own HTTP/1.1 front."""

from __future__ import annotations

import functools
from email.utils import formatdate

from relay.ingest.receiver import Answer

REASONS = {200: b"OK", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
           408: b"Request Timeout", 413: b"Payload Too Large", 414: b"URI Too Long",
           415: b"Unsupported Media Type", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 503: b"Service Unavailable",
           505: b"HTTP Version Not Supported"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_FAILED_BODY = b'{"code": "internal_error", "message": "relay could not answer this request"}'
# What a request is answered when answering it failed: made in advance, so it cannot fail too.
FAILED = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_FAILED_BODY), _FAILED_BODY))


@functools.lru_cache(maxsize=64)
def head(answer: Answer, connection: bytes, second: int) -> bytes:
    """The status line and headers of `answer` at `second` (for its Date); nearly every answer
    is the same 200, so they are cached."""
    lines = [b"HTTP/1.1 %d %s" % (answer.status, REASONS.get(answer.status, b"")),
             b"Content-Type: application/json", b"Content-Length: %d" % len(answer.body),
             b"Date: " + formatdate(second, usegmt=True).encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in answer.headers]
    if connection:
        lines.append(b"Connection: " + connection)
    return b"\r\n".join(lines) + b"\r\n\r\n"
