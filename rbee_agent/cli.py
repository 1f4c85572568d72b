"""`rbee-agent`: the node daemon's command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"], []):
        print("usage: rbee-agent serve [--host H] [--port N] [--config FILE]\n"
              "       python -m rbee_agent.worker --help   (one model worker)")
        return 0 if args else 2
    print(f"rbee-agent {args[0]}: not built yet (it comes with the agent issue).",
          file=sys.stderr)
    return 2
