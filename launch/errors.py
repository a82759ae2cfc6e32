"""The one exception the launcher raises for bad input; ``cli.main`` turns it into a message and exit code 2."""

from __future__ import annotations


class LaunchError(Exception):
    """A launch request that cannot run (bad argument, missing file or tool); raised before anything starts."""
