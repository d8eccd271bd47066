"""The official DINOv3 checkpoints on the Hub, as data (source: ../shared/DINOV3.md).

Used by ``list``, by the config-vs-registry check for official ids, and by the README's table. ``PINS`` holds
what is known exactly of Meta's release (commits, the weights' size and sha256; unknown stays None): a copy
from any source is compared with it (``check_official``). ``DINOV3_FETCHER_REGISTRY`` names a JSON file whose
entries replace (or add) pins, read at call time: for tests, or for an organisation that vets its own copies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import _env as env
from ._errors import ConfigError
from ._ids import is_commit, is_sha256
from ._layout import shard_names

__all__ = ["DEFAULT_MODEL", "PINS", "REGISTRY_ENV", "VARIANTS", "OfficialCheck", "Pin", "Variant", "check_official",
           "pins", "variant_for"]

DEFAULT_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"


@dataclass(frozen=True)
class Variant:
    """One official DINOv3 checkpoint: its repo id and architecture."""
    repo_id: str
    arch: str
    family: str  # "vit" or "convnext"
    params_m: float
    weights_bytes: int  # approximate fp32 size of the weights on the Hub
    hidden_size: int = 0
    heads: int = 0
    layers: int = 0
    intermediate_size: int = 0
    gated_mlp: bool = False
    depths: tuple[int, ...] = ()
    hidden_sizes: tuple[int, ...] = ()
    sharded: bool = False
    shards: int = 0  # how many shards the Hub holds, where that is known (0: not known, or a single file)

    @property
    def shard_names(self) -> tuple[str, ...]:
        """The shards' file names on the Hub, where their count is known (empty otherwise)."""
        return shard_names(self.shards)

    @property
    def is_default(self) -> bool:
        """Is this the default model (ViT-L/16)?"""
        return self.repo_id == DEFAULT_MODEL


def _vit(name: str, arch: str, d: int, h: int, n: int, i: int, gated: bool, params: float, size: float,
         sharded: bool = False, shards: int = 0) -> Variant:
    return Variant(f"facebook/{name}", arch, "vit", params, int(size * 1e9), d, h, n, i, gated, sharded=sharded,
                   shards=shards)


def _convnext(name: str, arch: str, depths: tuple[int, ...], widths: tuple[int, ...], params: float,
              size: float) -> Variant:
    return Variant(f"facebook/{name}", arch, "convnext", params, int(size * 1e9), depths=depths, hidden_sizes=widths)


VARIANTS: tuple[Variant, ...] = (
    _vit("dinov3-vits16-pretrain-lvd1689m", "ViT-S/16", 384, 6, 12, 1536, False, 21.60, 0.086),
    _vit("dinov3-vits16plus-pretrain-lvd1689m", "ViT-S+/16", 384, 6, 12, 1536, True, 28.69, 0.115),
    _vit("dinov3-vitb16-pretrain-lvd1689m", "ViT-B/16", 768, 12, 12, 3072, False, 85.66, 0.343),
    _vit("dinov3-vitl16-pretrain-lvd1689m", "ViT-L/16", 1024, 16, 24, 4096, False, 303.13, 1.21),
    _vit("dinov3-vitl16-pretrain-sat493m", "ViT-L/16 (satellite)", 1024, 16, 24, 4096, False, 303.13, 1.21),
    _vit("dinov3-vith16plus-pretrain-lvd1689m", "ViT-H+/16", 1280, 20, 32, 5120, True, 840.59, 3.36),
    _vit("dinov3-vit7b16-pretrain-lvd1689m", "ViT-7B/16", 4096, 32, 40, 8192, True, 6716.0, 26.9, sharded=True,
         shards=6),
    _vit("dinov3-vit7b16-pretrain-sat493m", "ViT-7B/16 (satellite)", 4096, 32, 40, 8192, True, 6716.0, 26.9,
         sharded=True),
    _convnext("dinov3-convnext-tiny-pretrain-lvd1689m", "ConvNeXt-T", (3, 3, 9, 3), (96, 192, 384, 768), 27.8, 0.111),
    _convnext("dinov3-convnext-small-pretrain-lvd1689m", "ConvNeXt-S", (3, 3, 27, 3), (96, 192, 384, 768), 49.5,
              0.198),
    _convnext("dinov3-convnext-base-pretrain-lvd1689m", "ConvNeXt-B", (3, 3, 27, 3), (128, 256, 512, 1024), 87.6,
              0.350),
    _convnext("dinov3-convnext-large-pretrain-lvd1689m", "ConvNeXt-L", (3, 3, 27, 3), (192, 384, 768, 1536), 196.2,
              0.785),
)

_BY_ID = {v.repo_id.lower(): v for v in VARIANTS}


def variant_for(repo_id: str) -> Variant | None:
    """The registry entry of an official repo id (case-insensitive), or None for any other repo."""
    return _BY_ID.get(repo_id.lower())


# ---------------------------------------------------------------- Meta's release, pinned

REGISTRY_ENV = "DINOV3_FETCHER_REGISTRY"


@dataclass(frozen=True)
class Pin:
    """What is known exactly of an official checkpoint: None (or empty) wherever it is not known."""

    repo_id: str
    commits: tuple[str, ...] = ()  # Hub commits known to hold these weights
    file: str = "model.safetensors"  # the weights file the sha256 is of
    size: int | None = None  # its exact size in bytes
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"commits": list(self.commits), "file": self.file, "size": self.size, "sha256": self.sha256}


def _pin(name: str, commits: tuple[str, ...], size: int | None, sha256: str | None) -> Pin:
    return Pin(f"facebook/{name}", commits, "model.safetensors", size, sha256)


# From public captures of the Hub's API (../shared/DINOV3.md): exact values only.
PINS: Mapping[str, Pin] = {p.repo_id: p for p in (
    _pin("dinov3-vitl16-pretrain-lvd1689m", ("ea8dc2863c51be0a264bab82070e3e8836b02d51",
                                             "dd0a398fa8e84f2a37179332f6c561d20276300b"),
         1212559808, "dcb2e45127cccbf1601e5f42fef165eea275c8e5213197e8dcf3f48822718179"),
    _pin("dinov3-vitb16-pretrain-lvd1689m", ("5931719e67bbdb9737e363e781fb0c67687896bc",),
         342662192, "9a21ac3df0c63839d62612dda6f454d816c25611cc7a52966ed5a5a94921dc8b"),
    _pin("dinov3-vits16-pretrain-lvd1689m", ("114c1379950215c8b35dfcd4e90a5c251dde0d32",),
         None, "4610ad75edef83e75afdebf162d148dc628045ea6cbb83d67d4708c709c4f91d"),
    _pin("dinov3-vits16plus-pretrain-lvd1689m", ("c93d816fc9e567563bc068f01475bec89cc634a6",),
         114794096, "208146e499dace99e4c9376ddb8a26f77d64c31c46c4dc4b86ff8bc63b0235e2"),
    _pin("dinov3-vith16plus-pretrain-lvd1689m", ("c807c9eeea853df70aec4069e6f56b28ddc82acc",),
         None, "3e1d4d18b9bfa9f28fad8e9de6a783f1313532d3460efa4cd0b12521d81d1a4d"),
    _pin("dinov3-vitl16-pretrain-sat493m", (),
         1212559808, "4e6356d992c1301b5e7c275f465e47296c5c4ad17052e262b29fc21e82ccc698"),
    _pin("dinov3-vit7b16-pretrain-lvd1689m", ("b80367753773648a6793235ab9c65cdbb029506f",), None, None),
)}


def _bad(path: str, what: str) -> Exception:
    return ConfigError(f"{REGISTRY_ENV}={path}: {what}",
                       'write {"owner/name": {"sha256": "<64 hex>", "size": <bytes or null>, "commits": [], '
                       '"file": "model.safetensors"}}, or unset it')


def _read_override(path: str) -> dict[str, Pin]:
    from ._userfile import REGISTRY_LIMIT, Refused, parse_json, read_regular

    try:
        data = parse_json(read_regular(path, REGISTRY_LIMIT))
    except Refused as exc:
        raise _bad(path, f"the file {exc.reason}") from None
    except ValueError as exc:
        raise _bad(path, f"the file {exc}") from None
    if not isinstance(data, dict):
        raise _bad(path, "not a JSON object of repo ids")
    out: dict[str, Pin] = {}
    for repo_id, e in data.items():
        if not isinstance(e, dict) or not set(e) <= {"commits", "file", "size", "sha256"}:
            raise _bad(path, f"the entry of {repo_id!r} is not an object of commits, file, size, sha256")
        sha, size, commits = e.get("sha256"), e.get("size"), e.get("commits", [])
        file = e.get("file", "model.safetensors")
        if sha is not None and not (isinstance(sha, str) and is_sha256(sha)):
            raise _bad(path, f"{repo_id}: sha256 must be 64 lower-case hex digits or null")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise _bad(path, f"{repo_id}: size must be a number of bytes or null")
        if not isinstance(commits, list) or not all(isinstance(c, str) and is_commit(c) for c in commits):
            raise _bad(path, f"{repo_id}: commits must be a list of 40-hex commit ids")
        if not isinstance(file, str) or not file:
            raise _bad(path, f"{repo_id}: file must be a file name")
        out[repo_id.lower()] = Pin(repo_id, tuple(commits), file, size, sha)
    return out


def pins() -> dict[str, Pin]:
    """The pins in force, by lower-cased repo id: the built-in ones, replaced or extended by DINOV3_FETCHER_REGISTRY.

    Raises ConfigError (exit 3) for an override file that cannot be read or is malformed.
    """
    out = {k.lower(): v for k, v in PINS.items()}
    if path := env.registry_file():
        out.update(_read_override(path))
    return out


class _Record(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


@dataclass(frozen=True)
class OfficialCheck:
    """Is a checkpoint's weights file Meta's release? ``official``: True (same sha256), False (differs), None
    (nothing to compare with: no pinned sha256 for this id, and not a byte-identical copy of another release)."""

    official: bool | None
    release: str | None = None  # the official repo id compared with
    sha256: str | None = None  # the copy's weights sha256
    expected: str | None = None  # the release's
    message: str = ""  # one line for the user ("" when there is nothing to say)

    def to_dict(self) -> dict[str, Any]:
        return {"official": self.official, "release": self.release, "sha256": self.sha256,
                "expected_sha256": self.expected, "message": self.message}


def check_official(repo_id: str, files: Mapping[str, _Record]) -> OfficialCheck:
    """Compare a checkpoint's weights (``files``: name -> size and sha256, as the manifest records them) with the
    pinned release of ``repo_id``; for another id, recognise a byte-identical copy of any pinned release."""
    table = pins()
    pin = table.get(repo_id.lower())
    if pin is not None and pin.sha256:
        rec = files.get(pin.file)
        if rec is not None and rec.sha256 == pin.sha256 and (pin.size is None or rec.size == pin.size):
            return OfficialCheck(True, pin.repo_id, rec.sha256, pin.sha256,
                                 f"identical to Meta's release, sha256 {pin.sha256[:8]}...")
        if rec is None:
            got = f"it has no {pin.file} (the release has one, sha256 {pin.sha256[:8]}...)"
        elif rec.sha256 != pin.sha256:
            got = f"sha256 {rec.sha256[:8]}... differs from the release's {pin.sha256[:8]}..."
        else:
            got = (f"its {pin.file} has {rec.size} bytes, the release {pin.size} (its sha256 {pin.sha256[:8]}... "
                   "matches: the pinned size is wrong)")
        return OfficialCheck(False, pin.repo_id, rec.sha256 if rec is not None else None, pin.sha256,
                             f"warning: these are NOT Meta's official weights of {pin.repo_id}: {got}")
    for other in table.values():  # a re-upload under another id may still be the release, byte for byte
        rec = files.get(other.file)
        if other.sha256 and rec is not None and rec.sha256 == other.sha256:
            return OfficialCheck(True, other.repo_id, rec.sha256, other.sha256,
                                 f"identical to Meta's release of {other.repo_id}, sha256 {other.sha256[:8]}...")
    if pin is not None or variant_for(repo_id) is not None:
        return OfficialCheck(None, pin.repo_id if pin else repo_id, message=(
            f"Meta's sha256 of {repo_id}'s weights is not known here: cannot tell whether these are the release"))
    return OfficialCheck(None)
