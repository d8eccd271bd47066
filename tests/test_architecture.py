"""The declared public API (issue 10): what the package exports, lazily, and that internals stay internal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dinov3_fetcher

SRC = Path(__file__).resolve().parent.parent / "src" / "dinov3_fetcher"
PUBLIC = {"fetch_dinov3", "validate_dinov3", "FetchResult", "load_teacher", "fetch_once", "DEFAULT_MODEL",
          "FetcherError", "ConfigError", "AuthenticationError", "RepositoryNotFoundError", "RevisionNotFoundError",
          "NotDinov3Error", "IntegrityError", "HubResponseError", "DiskSpaceError", "NetworkError",
          "LocalEntryNotFoundError", "LockTimeoutError", "VerificationError", "LoadError", "FetchInterrupted",
          "__version__"}


def test_the_public_api_is_exactly_the_declared_names_and_each_resolves() -> None:
    assert set(dinov3_fetcher.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(dinov3_fetcher, name) is not None, name
    assert issubclass(dinov3_fetcher.DiskSpaceError, OSError)
    assert issubclass(dinov3_fetcher.NetworkError, dinov3_fetcher.FetcherError)


def test_the_seeds_import_path_keeps_working() -> None:
    from dinov3_fetcher.fetch import fetch_dinov3, validate_dinov3

    assert fetch_dinov3 is dinov3_fetcher.fetch_dinov3
    assert validate_dinov3 is dinov3_fetcher.validate_dinov3


def test_importing_the_package_loads_no_internal_module() -> None:
    code = ("import sys, dinov3_fetcher; "
            "print(sorted(m for m in sys.modules if m.startswith('dinov3_fetcher.') or m == 'huggingface_hub'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_module_but_the_package_root_and_the_seeds_path_is_private() -> None:
    public = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                    if not any(part.startswith("_") for part in p.relative_to(SRC).parts))
    assert public == ["fetch.py"]


def test_no_module_is_over_the_size_a_reader_takes_in_at_once() -> None:
    sizes = {p.relative_to(SRC).as_posix(): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 420} == {}
