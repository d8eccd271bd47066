"""dinov3-fetcher: put a DINOv3 teacher checkpoint into dino_root, verified byte for byte.

    from dinov3_fetcher import fetch_dinov3, validate_dinov3
    path = fetch_dinov3("dinov3", "facebook/dinov3-vitl16-pretrain-lvd1689m")

The public API is what ``__all__`` lists; every module whose name starts with ``_`` is internal and may
change. Names are imported lazily, so ``import dinov3_fetcher`` (and the CLI's ``--help``) stays cheap.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (the command's start: see _dial)

__all__ = [
    "DEFAULT_MODEL",
    "AuthenticationError",
    "ConfigError",
    "DiskSpaceError",
    "FetchInterrupted",
    "FetchResult",
    "FetcherError",
    "HubResponseError",
    "IntegrityError",
    "LoadError",
    "LocalEntryNotFoundError",
    "LockTimeoutError",
    "NetworkError",
    "NotDinov3Error",
    "RepositoryNotFoundError",
    "RevisionNotFoundError",
    "VerificationError",
    "__version__",
    "fetch_dinov3",
    "fetch_once",
    "load_teacher",
    "read_pipeline_config",
    "validate_dinov3",
    "weights_size",
]

if TYPE_CHECKING:
    from typing import Any

    from ._config import read_pipeline_config
    from ._distributed import fetch_once
    from ._errors import (
        AuthenticationError,
        ConfigError,
        DiskSpaceError,
        FetcherError,
        FetchInterrupted,
        HubResponseError,
        IntegrityError,
        LoadError,
        LocalEntryNotFoundError,
        LockTimeoutError,
        NetworkError,
        NotDinov3Error,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        VerificationError,
    )
    from ._fetch import FetchResult, fetch_dinov3
    from ._load import load_teacher, weights_size
    from ._registry import DEFAULT_MODEL
    from ._validate import validate_dinov3
    from ._version import __version__

_WHERE = {
    "fetch_dinov3": "_fetch", "FetchResult": "_fetch", "validate_dinov3": "_validate",
    "load_teacher": "_load", "weights_size": "_load", "fetch_once": "_distributed", "DEFAULT_MODEL": "_registry",
    "read_pipeline_config": "_config", "__version__": "_version",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module(f".{_WHERE.get(name, '_errors')}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'dinov3_fetcher' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
