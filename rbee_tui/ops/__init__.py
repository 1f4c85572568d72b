"""The operator's operations, one module per family: `nodes`, `workers`, `models`.

Each operation is written once, typed, and called by both faces (principle 1): the CLI
(`rbee_tui/cli.py`) and the dashboard's screens only render the events an operation yields
and show the errors it raises. Nothing here prints, prompts or touches a widget. The
inference flow, the richest operation, has its own module (`rbee_tui/orchestrator.py`).
"""
