"""dinov3-fetcher: put a DINOv3 teacher checkpoint from the Hugging Face Hub into dino_root, verified.

    from dinov3_fetcher import fetch_dinov3, validate_dinov3
    path = fetch_dinov3("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "__version__",
    "fetch_dinov3",
    "fetch_once",
    "load_teacher",
    "validate_dinov3",
]

if TYPE_CHECKING:
    from .distributed import fetch_once
    from .fetch import fetch_dinov3, validate_dinov3
    from .load import load_teacher
    from .variants import DEFAULT_MODEL


def __getattr__(name: str) -> Any:
    # Lazy: `import dinov3_fetcher` stays cheap, so `--help` and warm runs start fast.
    if name in ("fetch_dinov3", "validate_dinov3"):
        from . import fetch

        return getattr(fetch, name)
    if name == "load_teacher":
        from .load import load_teacher

        return load_teacher
    if name == "fetch_once":
        from .distributed import fetch_once

        return fetch_once
    if name == "DEFAULT_MODEL":
        from .variants import DEFAULT_MODEL

        return DEFAULT_MODEL
    raise AttributeError(f"module 'dinov3_fetcher' has no attribute {name!r}")
