"""Names the CLI's argument parser and the operator's modules share.

Standard library only: `rbee --help` reads these before pydantic or Textual is loaded
(B151), and `config`, the chat and the CLI take them from here, so each is said once.
"""

from __future__ import annotations

LOCALHOST = "localhost"  # always a node: this machine's agent
DEFAULT_MODEL = "smollm2-135m"  # the bundled model every node has
