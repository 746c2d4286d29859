"""`python -m relay`: the same as the `relay` command."""

from relay.cli.commands import main

raise SystemExit(main())
