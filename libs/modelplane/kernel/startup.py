"""An error that stops a service before it serves, with a message for the operator."""

from __future__ import annotations


class StartupError(Exception):
    """The configuration names something that cannot be served (an unknown model, say):
    `modelplane serve` prints the message and exits 2 instead of a traceback."""
