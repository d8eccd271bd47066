"""What to fetch where: flags, the pipeline's config.json and the environment -> one validated FetchRequest.

Precedence: command-line flag (or API argument), then the config's ``train`` section, then the environment
(``DINOV3_FETCHER_SOURCE``), then the default. ``train.dino_root`` is resolved against the config file's folder
when relative, taken as given when absolute, and ``~`` is expanded. Everything downstream takes the request
as given: it is validated here, once.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _env as env
from ._errors import ConfigError, not_a_folder
from ._ids import is_repo_id
from ._registry import DEFAULT_MODEL
from ._sources import SOURCES

__all__ = ["DEFAULT_REVISION", "FetchRequest", "check_repo_id", "load_pipeline_config", "make_request",
           "read_pipeline_config", "resolve_request"]

DEFAULT_REVISION = "main"
DEFAULT_REVISIONS = {"hf": "main", "modelscope": "master"}  # each hub's default branch

# git's rules for ref names (git check-ref-format): no spaces, control characters, ~^:?*[\ , "..", "@{", "//",
# no leading "/" or "-", no trailing "/", "." or ".lock".
_REVISION = re.compile(r"^(?![/-])(?!.*\.\.)(?!.*//)(?!.*@\{)[^\x00-\x20~^:?*\[\\\x7f]{1,255}(?<![/.])(?<!\.lock)$")


@dataclass(frozen=True)
class FetchRequest:
    """Everything a fetch needs to know: where, which model, which revision."""

    dino_root: Path
    model: str = DEFAULT_MODEL
    revision: str = DEFAULT_REVISION
    source: str = "hf"
    config_path: Path | None = None
    require_official: bool = False  # refuse (exit 8) unless the weights are Meta's release, byte for byte


def load_pipeline_config(path: Path) -> dict[str, Any]:
    """Parse the pipeline config; raise ConfigError with the fix for each way it can be unusable."""
    from ._userfile import CONFIG_LIMIT, Refused, parse_json, read_regular

    path = Path(path).expanduser()
    try:
        raw = read_regular(path, CONFIG_LIMIT)
    except Refused as exc:
        if exc.missing:
            raise ConfigError(f"config file {path} does not exist",
                              "pass the pipeline's config.json with --config PATH") from None
        if exc.reason.startswith("is a folder"):
            raise ConfigError(f"config path {path} is a folder, not a file", "pass the config.json file itself") \
                from None
        raise ConfigError(f"config file {path} {exc.reason}",
                          "pass the pipeline's config.json with --config PATH") from None
    try:
        data = parse_json(raw)
    except ValueError as exc:
        raise ConfigError(f"config file {path} {exc}", "fix the JSON: a pipeline config is a small JSON object, "
                          'e.g. {"train": {"dino_root": "dinov3"}}') from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}, not an object",
                          'write it as {"train": {"dino_root": "dinov3"}}')
    return data


def _train_section(data: dict[str, Any], path: Path) -> dict[str, Any]:
    train = data.get("train")
    if train is None:
        raise ConfigError(f"config file {path} has no \"train\" section",
                          'add "train": {"dino_root": "dinov3"} or pass --dino-root DIR')
    if not isinstance(train, dict):
        raise ConfigError(f"\"train\" in {path} is a {type(train).__name__}, not an object",
                          'write it as "train": {"dino_root": "dinov3"}')
    return train


def _optional_str(train: dict[str, Any], key: str, path: Path) -> str | None:
    value = train.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"train.{key} in {path} must be a non-empty string, got {value!r}",
                          f"set train.{key} to a string or remove it")
    return value.strip()


def resolve_dino_root(value: str | os.PathLike[str], base: Path) -> Path:
    """Expand ``~``, resolve a relative path against ``base``; ConfigError for a path that is a file or that no
    folder can have (a NUL in it, a name over 255 bytes, longer than the system allows, a loop of links)."""
    if not str(value).strip():
        raise ConfigError("dino_root is empty", "pass a folder, e.g. --dino-root ./dinov3")
    fix = "point train.dino_root (or --dino-root) at a folder"
    if "\0" in str(value):
        raise ConfigError(f"dino_root {str(value)!r} holds a NUL character, which no path can", fix)
    root = Path(value).expanduser()
    if not root.is_absolute():
        root = base / root
    root = Path(os.path.abspath(root))
    shown = str(root) if len(str(root)) <= 120 else f"{str(root)[:100]}... ({len(os.fsencode(root))} bytes)"
    if any(len(os.fsencode(part)) > 255 for part in root.parts):
        raise ConfigError(f"dino_root {shown} has a name longer than 255 bytes, more than a file system allows", fix)
    try:
        st = root.stat()
    except FileNotFoundError:
        return root  # created by the fetch
    except NotADirectoryError:
        raise ConfigError(f"dino_root {shown} cannot be a folder: {not_a_folder(errno.ENOTDIR)}", fix) from None
    except OSError as exc:  # every name fits (checked above): a path too long is too long as a whole
        code = exc.errno or 0
        why = not_a_folder(code, names_fit=True) if code in (errno.ELOOP, errno.ENAMETOOLONG) else exc.strerror
        raise ConfigError(f"dino_root {shown} cannot be used: {why}", fix) from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"dino_root {root} is a file, not a folder",
                          "point train.dino_root (or --dino-root) at a folder")
    return root


def check_repo_id(model: str) -> str:
    """Return the repo id if it has the Hub's form ``namespace/name``, else raise ConfigError."""
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("the model id is empty", "pass --model facebook/dinov3-vitl16-pretrain-lvd1689m or omit it")
    model = model.strip()
    if len(model) > 96 or not is_repo_id(model) or "--" in model:  # the Hub's rule: no "--", <= 96 characters
        raise ConfigError(f"{model!r} is not a Hub repo id",
                          "use the form namespace/name, e.g. facebook/dinov3-vitl16-pretrain-lvd1689m")
    return model


def check_source(source: str) -> str:
    """Return the source name if it is one of the known sources, else raise ConfigError."""
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}", f"use one of: {', '.join(SOURCES)} (--source, "
                          "train.dino_source or DINOV3_FETCHER_SOURCE)")
    return source


def make_request(dino_root: str | os.PathLike[str], model: str = DEFAULT_MODEL, revision: str | None = None,
                 source: str | None = None, require_official: bool = False) -> FetchRequest:
    """The request of an API call (dino_root relative to the working directory), validated.

    Raises:
        ConfigError: dino_root is empty or a file, or the model id, revision or source is malformed.
    """
    chosen = check_source(source or env.default_source())
    return FetchRequest(resolve_dino_root(dino_root, Path.cwd()), check_repo_id(model),
                        check_revision(revision or DEFAULT_REVISIONS[chosen]), chosen,
                        require_official=bool(require_official))


def check_revision(revision: str) -> str:
    """Return the revision if git would accept it as a ref name or commit, else raise ConfigError."""
    if not isinstance(revision, str) or not _REVISION.match(revision.strip()):
        raise ConfigError(f"{revision!r} is not a revision (a git branch, tag or commit name)",
                          "pass a branch, a tag or a 40-hex commit to --revision")
    return revision.strip()


def resolve_request(
    config_path: str | os.PathLike[str] | None = None,
    *,
    dino_root: str | os.PathLike[str] | None = None,
    model: str | None = None,
    revision: str | None = None,
    source: str | None = None,
    require_official: bool | None = None,
) -> FetchRequest:
    """Combine flags and the pipeline config into a FetchRequest.

    Raises:
        ConfigError: the config is unusable, dino_root is missing or a file, or the model id is malformed.
    """
    train: dict[str, Any] = {}
    cfg_path: Path | None = None
    if config_path is not None:
        cfg_path = Path(os.path.abspath(Path(config_path).expanduser()))
        train = _train_section(load_pipeline_config(cfg_path), cfg_path)
    return _resolve(cfg_path, train, dino_root, model, revision, source, require_official)


def read_pipeline_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a pipeline's config.json asks the fetcher for, read exactly as ``dinov3-fetcher --config PATH`` reads
    it: ``dino_root`` (an absolute path, a relative one resolved against the file's folder), ``source``
    (train.dino_source, else DINOV3_FETCHER_SOURCE, else ``"hf"``), and ``model`` and ``revision``
    (train.dino_model and train.dino_revision; None where the config names none).

    Raises:
        ConfigError: the file, its ``train`` section or one of these keys is unusable.
    """
    cfg_path = Path(os.path.abspath(Path(path).expanduser()))
    train = _train_section(load_pipeline_config(cfg_path), cfg_path)
    req = _resolve(cfg_path, train)
    return {"dino_root": req.dino_root, "source": req.source,
            "model": req.model if train.get("dino_model") is not None else None,
            "revision": req.revision if train.get("dino_revision") is not None else None}


def _resolve(cfg_path: Path | None, train: dict[str, Any], dino_root: str | os.PathLike[str] | None = None,
             model: str | None = None, revision: str | None = None, source: str | None = None,
             require_official: bool | None = None) -> FetchRequest:
    """The request of the flags and a config's parsed ``train`` section (``resolve_request``)."""
    base = cfg_path.parent if cfg_path is not None else Path.cwd()

    if dino_root is not None:
        root = resolve_dino_root(dino_root, Path.cwd())
    elif cfg_path is not None:
        if "dino_root" not in train:
            raise ConfigError(f"train.dino_root is missing in {cfg_path}",
                              'add "dino_root": "dinov3" to the "train" section or pass --dino-root DIR')
        raw = train["dino_root"]
        if not isinstance(raw, str):
            raise ConfigError(f"train.dino_root in {cfg_path} must be a string, got {type(raw).__name__}",
                              'write it as "dino_root": "dinov3"')
        if not raw.strip():
            raise ConfigError(f"train.dino_root in {cfg_path} is empty", 'set it to a folder, e.g. "dinov3"')
        root = resolve_dino_root(raw, base)
    else:
        raise ConfigError("no dino_root given", "pass --config config.json or --dino-root DIR")

    where = cfg_path or Path("config")
    chosen_model = model if model is not None else _optional_str(train, "dino_model", where) or DEFAULT_MODEL
    chosen_source = check_source(source or _optional_str(train, "dino_source", where)
                                 or env.default_source())
    chosen_rev = revision if revision is not None else _optional_str(train, "dino_revision", where)
    strict = train.get("dino_require_official", False)
    if not isinstance(strict, bool):
        raise ConfigError(f"train.dino_require_official in {where} must be true or false, got {strict!r}",
                          "set it to true, false, or remove it")
    return FetchRequest(
        dino_root=root,
        model=check_repo_id(chosen_model),
        revision=check_revision(chosen_rev or DEFAULT_REVISIONS[chosen_source]),
        source=chosen_source,
        config_path=cfg_path,
        require_official=require_official if require_official else strict,
    )
