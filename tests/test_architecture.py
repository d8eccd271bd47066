"""The package's shape: the declared public API (exported lazily), internals that stay internal, and an import
graph without circles in which no module-private name crosses from one module to another."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dinov3_fetcher

SRC = Path(__file__).resolve().parent.parent / "src" / "dinov3_fetcher"
PUBLIC = {"fetch_dinov3", "validate_dinov3", "FetchResult", "load_teacher", "fetch_once", "DEFAULT_MODEL",
          "FetcherError", "ConfigError", "AuthenticationError", "RepositoryNotFoundError", "RevisionNotFoundError",
          "NotDinov3Error", "IntegrityError", "HubResponseError", "DiskSpaceError", "NetworkError",
          "LocalEntryNotFoundError", "LockTimeoutError", "VerificationError", "LoadError", "FetchInterrupted",
          "read_pipeline_config", "weights_size", "__version__"}


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


def test_importing_every_module_leaves_the_environment_as_it_was() -> None:
    modules = sorted(".".join(("dinov3_fetcher", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
                     for p in SRC.rglob("*.py") if p.name != "__main__.py")  # importing __main__ runs the CLI
    code = ("import importlib, os, sys; before = dict(os.environ); "
            "[importlib.import_module(m) for m in sys.argv[1:]]; print(dict(os.environ) == before)")
    env = {**os.environ, "HF_HUB_DOWNLOAD_TIMEOUT": "1.5", "HF_ENDPOINT": "http://127.0.0.1:9/"}
    out = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_every_module_but_the_package_root_and_the_seeds_path_is_private() -> None:
    public = sorted(p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
                    if not any(part.startswith("_") for part in p.relative_to(SRC).parts))
    assert public == ["fetch.py"]


OURS = ("dinov3_fetcher", "dinov3_bridge")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, str]]]:
    """Every import statement of every module under src/ (in functions and under TYPE_CHECKING too), as (module,
    name) pairs: ``from .a import b`` is (pkg.a, b), or (pkg.a.b, "") when b is a module; ``from . import
    __version__`` in a module of the package is (the package, "__version__")."""
    modules = {_module_name(p): p for p in SRC.parent.rglob("*.py")}
    out: dict[str, list[tuple[str, str]]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: list[tuple[str, str]] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(a.name, "") for a in node.names if a.name.split(".")[0] in OURS]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                base = base[:len(base) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.split(".")[0] not in OURS:
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    found.append((sub, "") if sub in modules else (target, a.name))
        out[name] = found
    return out


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of more than one module (Tarjan), and modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while (w := stack.pop()) != v:
                group.add(w)
            group.add(v)
            if len(group) > 1 or v in graph.get(v, ()):
                out.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_sees_every_module_and_imports_in_functions_and_under_type_checking() -> None:
    imports = _imports()
    assert set(imports) == {_module_name(p) for p in SRC.parent.rglob("*.py")}
    fetch = {t for t, _ in imports["dinov3_fetcher._fetch"]}
    assert "dinov3_fetcher._plan" in fetch  # imported inside a function
    assert "dinov3_fetcher._observe" in fetch  # imported under TYPE_CHECKING
    assert ("dinov3_fetcher", "load_teacher") in imports["dinov3_bridge.model"]


def test_no_module_is_in_an_import_circle() -> None:
    graph = {m: {t for t, _ in found if t != m} for m, found in _imports().items()}
    assert [sorted(g) for g in _circles(graph)] == []


def test_no_module_private_name_is_imported_from_another_module() -> None:
    crossing = [(m, t, n) for m, found in _imports().items() for t, n in found
                if n.startswith("_") and not n.startswith("__") and t != m]
    assert crossing == []


def test_the_bridge_is_built_on_the_public_api_only() -> None:
    used = {(t, n) for m, found in _imports().items() if m.startswith("dinov3_bridge") for t, n in found
            if t.startswith("dinov3_fetcher")}
    assert used and {t for t, _ in used} == {"dinov3_fetcher"}, used
    assert {n for _, n in used} <= set(dinov3_fetcher.__all__)
