"""The ``dinov3-fetcher`` command and ``python -m dinov3_fetcher``: a cold fetch's first connections open
(``_dial``) before the modules the command needs are imported (``_cli``)."""

from __future__ import annotations

import sys

from . import _dial

__all__ = ["main"]


def main() -> int:
    """The console script: the command line in ``sys.argv``; returns the exit code."""
    _dial.start(sys.argv[1:])
    from ._cli import main as run

    return run()
