"""Who is calling: the peer's address, or the client's behind trusted proxies (X-Forwarded-*)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(text: str) -> Network | None:
    """`text` (an address or a CIDR) as a network, or None when it is neither."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def invalid(entries: Iterable[str]) -> str | None:
    """The config check of `trusted_proxies`: which entry is no address or CIDR, if any."""
    for entry in entries:
        if network(entry) is None:
            return f"{entry!r} is not an IP address or CIDR (like 10.0.0.0/8 or 127.0.0.1)"
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443", as RFC 7239 writes it
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.7:51234": some proxies append the port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # A v4 client reaching a dual-stack socket shows up as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


class Proxies:
    """The configured trusted proxies, and what their headers say about the client."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks = tuple(n for n in map(network, entries) if n is not None)

    def trusts(self, text: str | None) -> bool:
        """Whether the address `text` is one of the trusted proxies."""
        if not self.networks or text is None:
            return False
        address = _ip(text)
        return address is not None and any(address in n for n in self.networks)

    def client(self, request: web.Request) -> str | None:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the
        right-most X-Forwarded-For entry that is not itself one (the left-most entries are
        whatever the client chose to send, so only those the proxies appended are believed)."""
        return self.client_of(request.remote, request.headers.getall("X-Forwarded-For", ()))

    def client_of(self, peer: str | None, forwarded: Iterable[str]) -> str | None:
        """`client` from the peer's address and the X-Forwarded-For header values."""
        if not self.trusts(peer):
            return peer
        hops = [h for v in forwarded for h in v.split(",")]
        nearest = peer
        for hop in reversed(hops):
            address = _ip(hop)
            if address is None:
                break  # a garbled entry: nothing left of it can be believed
            nearest = str(address)
            if not any(address in n for n in self.networks):
                break
        return nearest  # only proxies in the chain: the one farthest back is all we know

    def scheme(self, request: web.Request) -> str:
        """`http` or `https` as the client used it: X-Forwarded-Proto only from a trusted peer."""
        if self.trusts(request.remote):
            forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip()
            if forwarded.lower() in ("http", "https"):
                return forwarded.lower()
        return request.scheme


PROXIES = web.AppKey("proxies", Proxies)


def client(request: web.Request) -> str | None:
    """The client's address by the proxies configured for the request's Application."""
    proxies = request.config_dict.get(PROXIES)
    return proxies.client(request) if proxies is not None else request.remote
