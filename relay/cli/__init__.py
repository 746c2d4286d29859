"""The command line: `relay serve | check | try | report | salvage | queue ...` (`commands`,
`queue`). It loads the config and hands over to `relay.server`, `relay.ops` or `relay.outbox`.
"""

from relay.cli.commands import main

__all__ = ["main"]
