"""``python -m dinov3_fetcher`` is the ``dinov3-fetcher`` command."""

from .cli import main

raise SystemExit(main())
