"""The seed's import path, kept: ``from dinov3_fetcher.fetch import fetch_dinov3, validate_dinov3``.

The same functions are exported by the package itself (``from dinov3_fetcher import fetch_dinov3``).
"""

from ._fetch import FetchResult, fetch_dinov3
from ._validate import validate_dinov3

__all__ = ["FetchResult", "fetch_dinov3", "validate_dinov3"]
