"""What a DINOv3 checkpoint folder consists of: its file names and its weight layout (single file or shards).

The one place that decides between ``model.safetensors`` and ``model.safetensors.index.json`` plus the shards
it names, for a repo listing, a folder on disk, and the head start alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from ._errors import HubResponseError

__all__ = ["CONFIG", "INDEX", "OPTIONAL", "PREPROCESSOR", "SINGLE", "check_filename", "files_to_publish",
           "is_standard_weight", "may_publish", "optional_files",
           "read_json_object", "shard_names", "shards_from_index", "weight_files"]

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
OPTIONAL = ("README.md", "LICENSE.md")  # fetched when the repo has them; never required
MAX_NAME_BYTES = 255  # what a file name may be on the filesystems dino_root lives on
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Weight names transformers loads by itself: a stray one next to another model's files would be loaded instead.
_STANDARD_WEIGHTS = re.compile(r"model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")


def check_filename(name: object) -> str:
    """Accept only a plain file name at the repo's top level: no folders, '..', absolute paths or backslashes."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise HubResponseError(f"the source named a file {name!r} that is not a plain file name",
                               "refusing to write outside dino_root; check that the endpoint is a trusted hub")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise HubResponseError(f"the source named a file of {len(name.encode())} bytes ({name[:40]}...), longer "
                               f"than a file name may be ({MAX_NAME_BYTES})", "the repo is broken; report it")
    return name


def is_standard_weight(name: str) -> bool:
    """Is ``name`` a weight file name transformers loads by itself (single file, index or shard)?"""
    return bool(_STANDARD_WEIGHTS.fullmatch(name))


def optional_files(listing: Collection[str]) -> list[str]:
    """The optional files (``OPTIONAL``) a repo whose files are ``listing`` has."""
    return [n for n in OPTIONAL if n in listing]


def files_to_publish(listing: Collection[str], weights: list[str]) -> list[str]:
    """What a fetch publishes from a repo whose files are ``listing``: config.json, preprocessor_config.json, the
    index when the ``weights`` are its shards, the weights, and the optional files the repo has."""
    index = [INDEX] if INDEX in listing and SINGLE not in listing else []
    return [CONFIG, PREPROCESSOR, *index, *weights, *optional_files(listing)]


def may_publish(name: str) -> bool:
    """Is ``name`` a file a fetch may publish (or a weight name transformers loads by itself)?"""
    return name in (CONFIG, PREPROCESSOR, *OPTIONAL) or is_standard_weight(name)


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a small JSON object file (a regular file, never waited on); ValueError with the reason otherwise
    (its text completes "<the file> ...")."""
    from ._userfile import JSON_LIMIT, Refused, parse_json, read_regular

    try:
        data = parse_json(read_regular(path, JSON_LIMIT))
    except Refused as exc:
        if exc.missing:
            raise FileNotFoundError(2, "No such file or directory", str(path)) from None
        raise ValueError(exc.reason) from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    return data


def shard_names(count: int) -> tuple[str, ...]:
    """The names of a checkpoint's ``count`` shards, as transformers saves them (``model-0000K-of-0000N``)."""
    return tuple(f"model-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1))


def shards_from_index(index: dict[str, Any]) -> list[str]:
    """The shard file names an index's weight_map names, each checked to be a plain file name."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubResponseError(f"{INDEX} has no weight_map", "the repo's index file is broken; report it to its owner")
    return sorted({check_filename(v) for v in weight_map.values()})


def weight_files(names: Collection[str], read_index: Callable[[], dict[str, Any]] | None = None) -> list[str] | None:
    """The weight files among ``names``: ``[model.safetensors]``, or the shards the index names; None if neither.

    ``read_index`` reads the index (from disk, or once downloaded); without it the shards are taken from
    ``names`` by their standard form (a dry run, which downloads no index).
    """
    if SINGLE in names:
        return [SINGLE]
    if INDEX not in names:
        return None
    if read_index is None:
        return sorted(n for n in names if _SHARD.fullmatch(n))
    return shards_from_index(read_index())
