"""The README and the pages under docs/ say only what the code does.

Every ``dinov3-fetcher`` command line in them is parsed by the real argument parser; every environment variable
they name is read by the code (or by the library they say reads it); every Python example compiles, imports
names that exist and passes them parameters they take; every signature they state is the code's; every
relative link and every repository path they name exists; the recorded sessions (``console`` blocks) are
replayed against the Hub emulator, and the Python examples written for the emulator run. Offline and
in-process: no subprocess, no torch import.
"""

from __future__ import annotations

import argparse
import ast
import collections
import contextlib
import dataclasses
import importlib
import importlib.util
import inspect
import io
import itertools
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dinov3_fetcher import _cli
from dinov3_fetcher._errors import EXIT_CODES
from helpers import run_cli_here
from hub_server import HubServer
from serve import add_demo_repos

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]  # what a user reads: every example here must run as written
ALL_PAGES = [*PAGES, *(ROOT / n for n in ("ARCHITECTURE.md", "BENCHMARKS.md", "CHANGELOG.md", "DEVELOPERS.md"))]
SHELL = {"bash", "sh", "shell", "console"}
PACKAGES = ("dinov3_fetcher", "dinov3_bridge")
HEAVY = {"torch", "transformers"}  # a module importing these at its top is read from its source, not imported

# Variables the pages name that another component reads, not this package's code.
READ_ELSEWHERE = {
    "HTTP_PROXY": "urllib.request.getproxies", "HTTPS_PROXY": "urllib.request.getproxies",
    "ALL_PROXY": "urllib.request.getproxies", "NO_PROXY": "urllib.request.getproxies",
    "HF_HUB_DISABLE_XET": "huggingface_hub (the fetcher never uses Xet)",
    "HF_HOME": "huggingface_hub.constants (where the stored token is)",
    "HF_TOKEN_PATH": "huggingface_hub.constants (where the stored token is)",
}
NOT_READ = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"}  # named by the pages as variables that are not read
ENV_NAME = re.compile(r"\b(?:DINOV3_FETCHER_[A-Z0-9_]*[A-Z0-9]|HF_[A-Z0-9_]*[A-Z0-9]|MODELSCOPE_[A-Z0-9_]*[A-Z0-9]|"
                      r"SSL_CERT_(?:FILE|DIR)|(?:HTTPS?|ALL|NO)_PROXY|TRANSFORMERS_OFFLINE|REQUESTS_CA_BUNDLE|"
                      r"CURL_CA_BUNDLE)\b")


# -- reading the pages -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    out, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(\S*)", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith(m.group(1)):
            body.append(lines[i])
            i += 1
        out.append(Block(page, start + 1, m.group(2).lower(), "\n".join(body) + "\n"))
        i += 1
    return out


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return re.sub(r"^(`{3,}).*?^\1[^\n]*$", "", page.read_text(), flags=re.S | re.M)


def inline_code(page: Path) -> list[str]:
    return re.findall(r"`([^`\n]+)`", prose(page))


def shell_lines(block: Block) -> Iterator[str]:
    """Command lines of a shell block (in a ``console`` block, only those after a ``$`` prompt), continuations
    joined."""
    pending = ""
    for raw in block.text.splitlines():
        if block.lang == "console" and not pending:
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        yield pending + raw
        pending = ""


def tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def fetcher_invocations(line: str) -> list[list[str]]:
    """The arguments of each ``dinov3-fetcher`` (or ``python -m dinov3_fetcher``) the line runs."""
    toks, found = tokens(line), []
    for i, tok in enumerate(toks):
        start = i + 1 if tok == "dinov3-fetcher" else i + 3 if toks[i:i + 3] == ["python", "-m", "dinov3_fetcher"] \
            else None
        if start is None:
            continue
        args = []
        for t in toks[start:]:
            if t and set(t) <= set("|&;()<>"):
                break
            args.append(t)
        found.append(args)
    return found


def command_lines() -> Iterator[tuple[str, list[str]]]:
    """(where, arguments) of every dinov3-fetcher invocation in the pages' shell blocks and inline code, and in
    the Justfile."""
    for page in ALL_PAGES:
        for b in blocks(page):
            if b.lang in SHELL:
                for line in shell_lines(b):
                    for args in fetcher_invocations(line):
                        yield str(b), args
        for span in inline_code(page):
            if span.startswith(("dinov3-fetcher ", "python -m dinov3_fetcher ")) or span == "dinov3-fetcher":
                for args in fetcher_invocations(span):
                    yield f"{page.relative_to(ROOT)}: `{span}`", args
    for line in (ROOT / "Justfile").read_text().splitlines():
        for args in fetcher_invocations(line):
            yield "Justfile", args


# -- the command line --------------------------------------------------------------------------------------------

def test_every_command_line_in_the_docs_parses() -> None:
    parser = _cli.build_parser()
    seen, bad = collections.Counter[str](), []
    for where, args in command_lines():
        seen[where.split(":")[0]] += 1
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(_cli._argv(args))
        except SystemExit as exc:
            if exc.code not in (0, None):
                bad.append(f"{where}: dinov3-fetcher {shlex.join(args)}")
    assert bad == []
    assert seen["README.md"] >= 10 and seen["docs/cli.md"] >= 10, seen  # the extraction found the examples


def _parser_flags() -> set[str]:
    parser = _cli.build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    return {opt for p in parsers for a in p._actions for opt in a.option_strings}


def test_the_cli_reference_names_every_flag_and_no_other() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    synopsis = blocks(ROOT / "docs" / "cli.md")[0].text + "\n".join(re.findall(r"^\|.*$", page, flags=re.M))
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*[a-z])(?![\w-])", page))
    documented |= set(re.findall(r"(?<![\w-])(-[a-z])(?![\w-])", synopsis))  # short flags: synopsis and tables
    flags = _parser_flags()
    assert flags - documented == set(), "flags missing from docs/cli.md"
    assert documented - flags == set(), "docs/cli.md names flags that do not exist"
    commands = set(re.findall(r"^## `(\w+)`", page, flags=re.M))
    assert commands == set(_cli.COMMANDS), commands


def _script_flags(script: Path) -> set[str]:
    """The flags a bench script's argparse parser defines (read from its source: the scripts import torch)."""
    return {arg.value for node in ast.walk(ast.parse(script.read_text()))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
            for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")} | {"--help"}


def test_every_bench_command_in_the_docs_uses_flags_the_script_has() -> None:
    lines = [line for page in ALL_PAGES for b in blocks(page) if b.lang in SHELL for line in shell_lines(b)]
    lines += [span for page in ALL_PAGES for span in inline_code(page)]
    lines += (ROOT / "Justfile").read_text().splitlines()
    checked, bad = 0, []
    for line in lines:
        toks = tokens(line) if "bench/" in line else []
        for i, tok in enumerate(toks):
            if re.fullmatch(r"bench/\w+\.py", tok) and i and toks[i - 1] == "python":
                flags = _script_flags(ROOT / tok)
                args = list(itertools.takewhile(lambda t: not set(t) <= set("|&;()<>"), toks[i + 1:]))
                bad += [f"{tok} {a}" for a in args if a.startswith("--") and a.split("=")[0] not in flags]
                checked += 1
    assert bad == []
    assert checked >= 6


# -- environment, config keys, exit codes -------------------------------------------------------------------------

def _src_strings() -> str:
    """Every string literal in src/ (f-string parts included, docstrings and other bare strings left out)."""
    out = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare:
                out.append(node.value)
    return "\n".join(out)


def test_every_environment_variable_the_docs_name_is_read() -> None:
    literals = _src_strings()
    read = set(ENV_NAME.findall(literals))
    named = {n for page in [*PAGES, ROOT / "DEVELOPERS.md", ROOT / "ARCHITECTURE.md"]
             for n in ENV_NAME.findall(page.read_text())}
    assert named - read - set(READ_ELSEWHERE) - NOT_READ == set()
    ours = {n for n in read if n.startswith("DINOV3_FETCHER_")}
    table = (ROOT / "docs" / "environment.md").read_text()
    assert {n for n in ours if f"`{n}" not in table} == set(), "variables missing from docs/environment.md"
    assert len(ours) >= 10


def test_the_config_keys_in_the_readme_are_the_ones_read() -> None:
    readme = README.read_text()
    documented = set(re.findall(r"^\| `train\.(\w+)` \|", readme, flags=re.M))
    config = (SRC / "dinov3_fetcher" / "_config.py").read_text()
    read = set(re.findall(r"\"(dino_\w+)\"", config))
    assert documented == read


def _exit_rows(page: Path) -> dict[str, int]:
    return {name: int(code) for code, name in re.findall(r"^\| (\d+) \| `(\w+)`", page.read_text(), flags=re.M)}


@pytest.mark.parametrize("page", [README, ROOT / "docs" / "exit-codes.md"], ids=lambda p: p.name)
def test_the_exit_code_tables_are_the_codes(page: Path) -> None:
    assert _exit_rows(page) == {n: c for n, c in EXIT_CODES.items() if n[0].isupper()}


# -- Python ------------------------------------------------------------------------------------------------------

def python_blocks(pages: list[Path] = PAGES) -> list[Block]:
    return [b for page in pages for b in blocks(page) if b.lang == "python"]


def _module_source(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.origin) if spec is not None and spec.origin else None


def _heavy(module: str) -> bool:
    """Whether importing ``module`` imports torch or transformers (then it is read, not imported)."""
    src = _module_source(module)
    if src is None:
        return False
    for node in ast.parse(src.read_text()).body:
        for stmt in [node, *(node.body if isinstance(node, ast.Try) else [])]:
            if isinstance(stmt, ast.Import) and any(a.name.split(".")[0] in HEAVY for a in stmt.names):
                return True
    return False


@dataclasses.dataclass
class Static:
    """A function or class read from its module's source: its parameters, defaults as source text."""

    module: str
    node: ast.FunctionDef | ast.ClassDef

    def signature(self) -> inspect.Signature:
        fn = self.node
        if isinstance(fn, ast.ClassDef):
            init = next((n for n in fn.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
            assert init is not None, f"{self.module}.{fn.name}: no __init__ to read"
            return _ast_signature(init, drop_first=True)
        return _ast_signature(fn, drop_first=False)

    def member(self, name: str) -> Static:
        assert isinstance(self.node, ast.ClassDef)
        found = next((n for n in self.node.body if isinstance(n, ast.FunctionDef) and n.name == name), None)
        assert found is not None, f"{self.module}.{self.node.name} has no {name}"
        return Static(self.module, found)


def _ast_signature(fn: ast.FunctionDef, drop_first: bool) -> inspect.Signature:
    a, params = fn.args, []
    positional = [*a.posonlyargs, *a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = inspect.Parameter.POSITIONAL_ONLY if i < len(a.posonlyargs) else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(arg.arg, kind, default=inspect.Parameter.empty if default is None
                                        else _Source(ast.unparse(default))))
    if a.vararg:
        params.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, kw_default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty
                                        if kw_default is None else _Source(ast.unparse(kw_default))))
    if a.kwarg:
        params.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    if drop_first:
        params = params[1:]
    return inspect.Signature(params)


@dataclasses.dataclass(frozen=True)
class _Source:
    text: str


def resolve(module: str, name: str) -> Any:
    """``from module import name``: the object, or a Static read from the source where importing is heavy;
    raises LookupError when it does not exist."""
    if _heavy(module):
        src = _module_source(module)
        assert src is not None
        for node in ast.parse(src.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                return Static(module, node)
        raise LookupError(f"{module} defines no {name}")
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return getattr(mod, name)
    with contextlib.suppress(ImportError):
        return importlib.import_module(f"{module}.{name}")
    raise LookupError(f"{module} has no {name}")


def signature_of(obj: Any) -> inspect.Signature:
    return obj.signature() if isinstance(obj, Static) else inspect.signature(obj)


def attribute(obj: Any, name: str) -> Any:
    if isinstance(obj, Static):
        return obj.member(name)
    if inspect.ismodule(obj) and not hasattr(obj, name):
        return resolve(obj.__name__, name)
    if not hasattr(obj, name):
        raise LookupError(f"{getattr(obj, '__name__', obj)} has no attribute {name}")
    return getattr(obj, name)


def _is_stub(node: ast.stmt) -> bool:
    return isinstance(node, ast.FunctionDef) and len(node.body) == 1 and isinstance(node.body[0], ast.Expr) \
        and isinstance(node.body[0].value, ast.Constant) and node.body[0].value.value is Ellipsis


def _public(name: str) -> Any:
    """A public name of either package, for a stated signature."""
    import dinov3_bridge
    import dinov3_fetcher

    if name in dinov3_fetcher.__all__:
        return resolve("dinov3_fetcher", name)
    if name in dinov3_bridge.__all__:
        for module in ("dinov3_bridge.config", "dinov3_bridge.model"):
            with contextlib.suppress(LookupError):
                return resolve(module, name)
    raise LookupError(f"{name} is not public in {PACKAGES}")


def check_stated_signature(stub: ast.FunctionDef, where: str) -> None:
    """A ``def name(...): ...`` in the docs states the parameters (names, kinds, defaults) of the public
    ``name``; annotations are left out of the docs."""
    obj = _public(stub.name)
    actual = signature_of(obj)
    stated = _ast_signature(stub, drop_first=False)
    assert [(p.name, p.kind) for p in stated.parameters.values()] == \
        [(p.name, p.kind) for p in actual.parameters.values()], f"{where}: {stub.name}{actual}"
    real = not isinstance(obj, Static)
    fields = {f.name: f for f in dataclasses.fields(obj)} if real and dataclasses.is_dataclass(obj) else {}
    for p in actual.parameters.values():
        doc = stated.parameters[p.name].default
        if p.default is inspect.Parameter.empty or isinstance(p.default, _Source):
            assert doc == p.default, f"{where}: {stub.name}({p.name}=...): the code has {p.default}"
            continue
        assert isinstance(doc, _Source), f"{where}: {stub.name}({p.name}) has a default in the code: {p.default!r}"
        module = sys.modules[obj.__module__]
        value = eval(doc.text, vars(module))  # a literal, or a name of the function's own module
        expected = p.default
        if p.name in fields and fields[p.name].default_factory is not dataclasses.MISSING:
            expected = fields[p.name].default_factory()
        assert value == expected, f"{where}: {stub.name}({p.name}={doc.text}): the code has {expected!r}"


def check_calls(tree: ast.Module, where: str) -> int:
    """Every name imported from the packages exists, and every call of one (or of its attributes) binds."""
    bound: dict[str, Any] = {}
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            for alias in node.names:
                bound[alias.asname or alias.name] = resolve(node.module or "", alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:  # import a.b binds a; import a.b as z binds a.b
                    name = alias.name if alias.asname else alias.name.split(".")[0]
                    bound[alias.asname or name] = importlib.import_module(name)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        chain, func = [], node.func
        while isinstance(func, ast.Attribute):
            chain.insert(0, func.attr)
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in bound:
            continue
        target = bound[func.id]
        for attr in chain:
            target = attribute(target, attr)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            continue
        sig = signature_of(target)
        try:
            sig.bind(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
        except TypeError as exc:
            raise AssertionError(f"{where}: {ast.unparse(node)}: {exc} (the code takes {sig})") from None
        checked += 1
    return checked


@pytest.mark.parametrize("block", python_blocks(), ids=str)
def test_python_examples_import_and_call_what_exists(block: Block) -> None:
    tree = ast.parse(block.text, filename=str(block))
    compile(tree, str(block), "exec")
    if all(_is_stub(n) for n in tree.body):
        for stub in tree.body:
            assert isinstance(stub, ast.FunctionDef)
            check_stated_signature(stub, str(block))
        return
    assert check_calls(tree, str(block)) >= 1, f"{block}: the example calls nothing of the API"


def test_every_public_function_has_its_signature_stated() -> None:
    import dinov3_fetcher

    stated = {n.name for b in python_blocks() for n in ast.parse(b.text).body if _is_stub(n)}
    public = {n: _public(n) for n in dinov3_fetcher.__all__}
    functions = {n for n, obj in public.items()
                 if inspect.isfunction(obj) or (isinstance(obj, Static) and isinstance(obj.node, ast.FunctionDef))}
    assert {"fetch_dinov3", "read_pipeline_config", "weights_size"} <= functions  # the public names were found
    assert functions | {"DinoV3Config", "DinoV3Teacher"} <= stated


# -- links and paths ---------------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", prose(page), flags=re.M)}


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_exist(page: Path) -> None:
    text = prose(page)
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            missing.append(target)
    for span in re.findall(r"`((?:tests|bench|src|docs|\.ci)/[\w./-]+\.(?:py|md|sh))\b", page.read_text()):
        if not (ROOT / span).exists():
            missing.append(span)
    assert missing == []


# -- words that do not ship --------------------------------------------------------------------------------------

SHIPPED = ["src", "README.md", "docs", "BENCHMARKS.md", "ARCHITECTURE.md", "DEVELOPERS.md", "CHANGELOG.md", "bench",
           "tests", ".ci", "pyproject.toml"]
# Tracker numbers, the development's own places and story: what ships speaks of the product only.
NOT_SHIPPED = re.compile(r"\b[Ii]ssues? #?[0-9]+\b|\bitem [0-9]+\b|\b(?:this|previous|earlier) session\b|"
                         r"\bworktree\b|\bwt-[a-z]+\b|/" r"work/|\breview fix\b")


def _shipped_text() -> Iterator[tuple[Path, str]]:
    # what git would ship (tracked, or new and not ignored): a bench's results or a build are not the product
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                             "--", *SHIPPED], capture_output=True, check=True)
    for path in (ROOT / n for n in sorted(set(listed.stdout.decode().split("\0"))) if n):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        data = path.read_bytes()
        if b"\0" not in data:
            yield path, data.decode("utf-8", "replace")


def test_shipped_files_name_no_tracker_branch_or_machine() -> None:
    hits, read = [], 0
    for path, text in _shipped_text():
        read += 1
        for n, line in enumerate(text.splitlines(), 1):
            if NOT_SHIPPED.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == []
    assert read >= 100  # the walk found the tree


def test_the_shipped_words_check_can_fail() -> None:
    # each example is split in two literals, so that this file does not hold the words it checks for
    for line in ["see issue" " 21", "Issue" " #7", "item" " 12 of the list", "as this" " session found",
                 "a git work" "tree", "on wt" "-core", "under /" "work/main", "a review" " fix"]:
        assert NOT_SHIPPED.search(line), line
    assert not NOT_SHIPPED.search("a checkout of an older commit; the issuer; items 3")


# -- the quickstart ----------------------------------------------------------------------------------------------

def test_the_quickstart_is_two_commands_and_ci_runs_the_test_one() -> None:
    readme = README.read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first = next(b for b in blocks(README) if b.lang == "bash" and b.text.strip() in section)
    commands = [line for line in first.text.splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, commands
    install, _, fetch = commands[0].partition(" && ")
    install2, _, test = commands[1].partition(" && ")
    assert install == install2 == "python3 -m pip install -q uv"
    assert tokens(fetch)[:3] == ["uv", "run", "dinov3-fetcher"] and "--config" in tokens(fetch)
    config = json.loads((ROOT / tokens(fetch)[tokens(fetch).index("--config") + 1]).read_text())
    assert config["train"]["dino_root"]
    assert test.startswith("uv run ")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, f"CI does not run the README's test command {test!r}"
    assert "python3 -m pip install --quiet uv" in (ROOT / ".ci" / "run").read_text()


# -- examples that run against the Hub emulator ------------------------------------------------------------------

DEMO = "/tmp/demo"  # where the recorded session ran
DEMO_CONFIG = """echo '{"train": {"dino_root": "dinov3"}}' > config.json"""
_VOLATILE = [
    (re.compile(r"http://127\.0\.0\.1:\d+"), "http://127.0.0.1:PORT"),
    (re.compile(r"\b\d+(?:\.\d+)? s\b"), "N s"),  # seconds taken
    (re.compile(r"\b[\d.]+ [KMGT]?B free\b"), "N free"),
    (re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"), "DATE"),
]


def _normal(line: str, demo: str) -> str:
    line = line.rstrip().replace(demo, DEMO)
    for pattern, repl in _VOLATILE:
        line = pattern.sub(repl, line)
    return line


def sessions() -> list[Block]:
    return [b for page in PAGES for b in blocks(page) if b.lang == "console"]


def _steps(block: Block) -> list[tuple[str, list[str]]]:
    """(command line, the output lines it shows, the ``[exit N]`` line included) of a recorded session."""
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block}: output before the first command"
            steps[-1][1].append(line)
    return steps


@pytest.fixture
def demo_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as hub:
        add_demo_repos(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


@pytest.mark.parametrize("block", sessions(), ids=str)
def test_recorded_sessions_replay(block: Block, demo_hub: HubServer, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if "config.json" in block.text:
        assert DEMO_CONFIG in block.page.read_text(), f"{block}: the session's setup is not on its page"
        (tmp_path / "config.json").write_text(DEMO_CONFIG.split("'")[1])
    monkeypatch.chdir(tmp_path)
    for command, shown in _steps(block):
        toks = tokens(command)
        env = dict(t.split("=", 1) for t in toks[:toks.index("dinov3-fetcher")])
        (args,) = fetcher_invocations(command)
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            code, out, err = run_cli_here(args)
        expected = [ln for ln in shown if not re.fullmatch(r"\[exit \d+\]", ln)]
        exits = [int(ln[6:-1]) for ln in shown if re.fullmatch(r"\[exit \d+\]", ln)]
        assert code == (exits[0] if exits else 0), f"{block}: $ {command}\n{err}"
        got = collections.Counter(_normal(ln, str(tmp_path)) for ln in (out + err).splitlines() if ln.strip())
        want = collections.Counter(_normal(ln, str(tmp_path)) for ln in expected if ln.strip())
        assert got == want, f"{block}: $ {command}"


@pytest.mark.parametrize("block", [b for b in python_blocks() if "tiny-org/" in b.text], ids=str)
def test_python_examples_for_the_emulator_run(block: Block, demo_hub: HubServer, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(block.text, str(block), "exec"), {"__name__": "__docs__"})


def test_the_registry_example_is_a_valid_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinov3_fetcher._registry import pins

    example = next(b for b in blocks(ROOT / "docs" / "sources.md") if b.lang == "json")
    (tmp_path / "pins.json").write_text(example.text)
    monkeypatch.setenv("DINOV3_FETCHER_REGISTRY", str(tmp_path / "pins.json"))
    assert set(json.loads(example.text)) <= {p.repo_id for p in pins().values()}


def test_the_config_example_is_a_valid_config(tmp_path: Path) -> None:
    from dinov3_fetcher._config import resolve_request

    example = next(b for b in blocks(README) if b.lang == "json")
    (tmp_path / "config.json").write_text(example.text)
    assert resolve_request(tmp_path / "config.json").dino_root == tmp_path / "dinov3"


# -- ARCHITECTURE.md ---------------------------------------------------------------------------------------------

ARCHITECTURE = ROOT / "ARCHITECTURE.md"
FETCHER = SRC / "dinov3_fetcher"


def _rel(path: Path) -> str:
    return path.relative_to(FETCHER).as_posix()


def _table_modules(after: str) -> set[str]:
    """The module column of the first table after the line ``after``."""
    lines = ARCHITECTURE.read_text().split(after, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    return {m.group(1) for line in table if (m := re.match(r"^\| `([\w/.]+\.py)` \|", line))}


@pytest.mark.parametrize(("heading", "package"), [("`src/dinov3_fetcher/`:", "dinov3_fetcher"),
                                                   ("`src/dinov3_bridge/`", "dinov3_bridge")])
def test_the_architecture_tables_list_exactly_the_modules_that_exist(heading: str, package: str) -> None:
    files = {p.relative_to(SRC / package).as_posix() for p in (SRC / package).rglob("*.py")}
    assert _table_modules(heading) == files


def test_the_names_in_the_architecture_flow_exist() -> None:
    flow = next(b for b in blocks(ARCHITECTURE) if b.lang == "text").text
    names = re.findall(r"\b(_[a-z_]+(?:\.[A-Za-z_]+)+)", flow)
    assert len(names) >= 10
    for dotted in names:
        module, *attrs = dotted.split(".")
        obj: Any = importlib.import_module(f"dinov3_fetcher.{module}")
        for attr in attrs:
            if inspect.ismodule(obj) and not hasattr(obj, attr):  # a submodule this process has not imported yet
                with contextlib.suppress(ModuleNotFoundError):
                    importlib.import_module(f"{obj.__name__}.{attr}")
            assert hasattr(obj, attr), f"ARCHITECTURE.md names {dotted}, which does not exist"
            obj = getattr(obj, attr)


def _who_touches_what() -> dict[str, set[str]]:
    """What the code does, for each list of "Who touches what"."""
    env, state, sources, hub, bridge = set(), set(), set(), set(), set()
    for path in sorted(FETCHER.rglob("*.py")):
        tree = ast.parse(path.read_text())
        bare = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv") \
                    and isinstance(node.value, ast.Name) and node.value.id == "os":
                env.add(_rel(path))
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".") + ([a.name for a in node.names] if not node.module else [])
                if "_state" in parts and _rel(path).split("/")[0] != "_state":
                    state.add(_rel(path))
                if "modelscope" in parts:
                    sources.add(_rel(path))
                if parts[0] == "huggingface_hub":
                    hub.add(_rel(path))
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "huggingface_hub" for a in node.names):
                hub.add(_rel(path))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare \
                    and "modelscope" in node.value:
                sources.add(_rel(path))
    for path in (SRC / "dinov3_bridge").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dinov3_fetcher"):
                bridge.add(node.module or "")
    return {"Read `os.environ` directly": env, "Import `_state`": state,
            "Name a source outside `_sources/`": {m for m in sources if not m.startswith("_sources/")},
            "Import huggingface_hub": hub, "`dinov3_bridge` imports from `dinov3_fetcher`": bridge}


def test_who_touches_what_is_what_the_code_does() -> None:
    section = ARCHITECTURE.read_text().split("## Who touches what", 1)[1].split("\n## ", 1)[0]
    bullets = {m.group(1): m.group(2) for m in re.finditer(r"^- \*\*(.+?)\*\*(.*?)(?=^- |\Z)", section,
                                                            flags=re.M | re.S)}
    facts = _who_touches_what()
    assert set(bullets) == set(facts)
    for key, text in bullets.items():
        stated = {m for m in re.findall(r"`([\w/.]+)`", text) if m.endswith(".py") or m.startswith("dinov3_fetcher")}
        assert stated == facts[key], f"ARCHITECTURE.md, {key}: the code has {sorted(facts[key])}"
