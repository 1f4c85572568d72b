"""`python -m rbee_agent serve`: the same as the `rbee-agent` console script."""

from rbee_agent.cli import main

raise SystemExit(main())
