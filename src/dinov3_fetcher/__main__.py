"""``python -m dinov3_fetcher`` is the ``dinov3-fetcher`` command."""

from ._cli import main

raise SystemExit(main())
