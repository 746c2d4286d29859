"""Where the running relay of a config answers its admin requests, for commands beside it."""

from __future__ import annotations

from relay.config.model import Config


def admin_url(config: Config, path: str) -> str:
    """`path` at `admin.listen`, else at `listen`; a wildcard address is asked on loopback."""
    where = config.admin if config.admin.listen else config
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(where.host, where.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{where.port}{path}"
