"""rbee's node side: the agent daemon and the llama.cpp worker processes it supervises.

Nothing under this package may import textual or asyncssh (a test proves it): nodes install
the agent without the operator's UI dependencies.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rbee")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
