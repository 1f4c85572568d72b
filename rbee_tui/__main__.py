"""`python -m rbee_tui`: the same as the `rbee` console script."""

from rbee_tui.cli import main

raise SystemExit(main())
