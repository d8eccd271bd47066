"""``python -m dinov3_fetcher`` is the ``dinov3-fetcher`` command."""

from ._entry import main

raise SystemExit(main())
