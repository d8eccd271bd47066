"""Is dino_root a complete, loadable DINOv3 checkpoint? Checks that read kilobytes, not gigabytes.

- config.json and preprocessor_config.json parse, and the config says DINOv3;
- the weights: model.safetensors, or model.safetensors.index.json plus every shard it names;
- every safetensors header is well formed and its offsets account exactly for the file's size;
- the tensors agree with the config (hidden size, layers, patch size, registers, MLP kind, ConvNeXt stages);
- with a manifest: it is complete, and every file it lists is there with its recorded size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HubResponseError
from .safetensors import SafetensorsError, TensorInfo, read_header
from .state import Manifest, StateDir
from .variants import variant_for

__all__ = [
    "DINOV3_MODEL_TYPES",
    "Problem",
    "check_filename",
    "config_problem",
    "find_problems",
    "registry_mismatch",
    "shards_from_index",
    "tensor_mismatch",
    "validate_dinov3",
]

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DINOV3_MODEL_TYPES = frozenset({"dinov3_vit", "dinov3_convnext"})
MAX_JSON_BYTES = 64 * 1024 * 1024
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_LAYER = re.compile(r"^layer\.(\d+)\.")
_STAGE_LAYER = re.compile(r"^stages\.(\d+)\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Problem:
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def check_filename(name: object) -> str:
    """Accept only a plain file name at the repo's top level: no folders, '..', absolute paths or backslashes."""
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or ".." in name:
        raise HubResponseError(f"the Hub named a file {name!r} that is not a plain file name",
                               "refusing to write outside dino_root; check HF_ENDPOINT points at a trusted Hub")
    return name


def read_json_object(path: Path) -> dict[str, Any]:
    """Parse a small JSON object file; ValueError with the reason otherwise."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"is larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"is not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("is not usable JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError("is not a JSON object")
    return data


def config_problem(cfg: dict[str, Any]) -> str | None:
    """Why this config is not a DINOv3 config, or None."""
    model_type = cfg.get("model_type")
    if model_type not in DINOV3_MODEL_TYPES:
        return f"model_type is {model_type!r}, not a DINOv3 model (dinov3_vit or dinov3_convnext)"
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size") \
        if model_type == "dinov3_vit" else ("depths", "hidden_sizes")
    missing = [k for k in needed if k not in cfg]
    return f"config lacks {', '.join(missing)}" if missing else None


def shards_from_index(index: dict[str, Any]) -> list[str]:
    """The shard file names an index's weight_map names, each checked to be a plain file name."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HubResponseError(f"{INDEX} has no weight_map", "the repo's index file is broken; report it to its owner")
    return sorted({check_filename(v) for v in weight_map.values()})


def _shape(tensors: dict[str, TensorInfo], name: str) -> tuple[int, ...] | None:
    t = tensors.get(name)
    return t.shape if t is not None else None


def tensor_mismatch(cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> str | None:
    """The first disagreement between config.json and the tensors' names and shapes, in words, or None."""
    if cfg.get("model_type") == "dinov3_convnext":
        return _convnext_mismatch(cfg, tensors)
    d, i = cfg.get("hidden_size"), cfg.get("intermediate_size")
    n, heads, p = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads"), cfg.get("patch_size")
    regs, channels = cfg.get("num_register_tokens", 0), cfg.get("num_channels", 3)
    if not all(isinstance(x, int) for x in (d, i, n, heads, p, regs, channels)):
        return "config's sizes (hidden_size, intermediate_size, layers, heads, patch_size) are not all integers"
    assert isinstance(d, int) and isinstance(i, int) and isinstance(p, int) and isinstance(channels, int)
    if not isinstance(heads, int) or heads <= 0 or d % heads:
        return f"hidden_size {d} is not divisible by num_attention_heads {heads}"
    checks: list[tuple[str, tuple[int, ...], str]] = [
        ("embeddings.cls_token", (1, 1, d), f"hidden size {d}"),
        ("embeddings.patch_embeddings.weight", (d, channels, p, p), f"patch size {p} and hidden size {d}"),
        ("layer.0.attention.q_proj.weight", (d, d), f"hidden size {d}"),
        ("layer.0.mlp.up_proj.weight", (i, d), f"intermediate size {i}"),
        ("norm.weight", (d,), f"hidden size {d}"),
    ]
    if regs:
        checks.append(("embeddings.register_tokens", (1, regs, d), f"{regs} register tokens"))
    for name, want, meaning in checks:
        got = _shape(tensors, name)
        if got is None:
            return f"the weights have no tensor {name}"
        if got != want:
            return f"config says {meaning}, but tensor {name} has shape {list(got)} (expected {list(want)})"
    layers = {int(m.group(1)) for k in tensors if (m := _LAYER.match(k))}
    if len(layers) != n or layers != set(range(len(layers))):
        return f"config says {n} layers, the weights have {len(layers)}"
    gated = any(k.startswith("layer.0.mlp.gate_proj.") for k in tensors)
    if gated != bool(cfg.get("use_gated_mlp", False)):
        return ("config says a " + ("gated (SwiGLU)" if cfg.get("use_gated_mlp") else "plain") +
                " MLP, but the weights " + ("have" if gated else "lack") + " mlp.gate_proj")
    return None


def _convnext_mismatch(cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> str | None:
    depths, widths = cfg.get("depths"), cfg.get("hidden_sizes")
    if not isinstance(depths, list) or not isinstance(widths, list) or len(depths) != len(widths):
        return "config's depths and hidden_sizes are not two lists of the same length"
    found: dict[int, set[int]] = {}
    for k in tensors:
        if m := _STAGE_LAYER.match(k):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    for stage, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        have = len(found.get(stage, ()))
        if have != depth:
            return f"config says stage {stage} has {depth} blocks, the weights have {have}"
        dw = _shape(tensors, f"stages.{stage}.layers.0.depthwise_conv.weight")
        if dw is not None and (not dw or dw[0] != width):  # a 0-d tensor has no channel dimension at all
            return f"config says stage {stage} is {width} wide, its depthwise conv has {dw[0] if dw else 'no'} channels"
    if len(found) != len(depths):
        return f"config says {len(depths)} stages, the weights have {len(found)}"
    return None


def registry_mismatch(repo_id: str, cfg: dict[str, Any]) -> str | None:
    """For an official repo id, the first way its config differs from the known architecture, or None."""
    v = variant_for(repo_id)
    if v is None:
        return None
    if v.family == "convnext":
        want: dict[str, Any] = {"depths": list(v.depths), "hidden_sizes": list(v.hidden_sizes)}
    else:
        want = {"hidden_size": v.hidden_size, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                "intermediate_size": v.intermediate_size, "use_gated_mlp": v.gated_mlp}
    for key, value in want.items():
        got = cfg.get(key, False if key == "use_gated_mlp" else None)
        if got != value:
            return f"{repo_id} is a {v.arch} ({key} {value}), but its config.json says {key} {got}"
    return None


def find_problems(root: Path, manifest: Manifest | None = None) -> list[Problem]:
    """Everything wrong with ``root`` as a DINOv3 checkpoint; empty when it is valid.

    ``manifest`` defaults to the one in root's state folder (if any).
    """
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "is not a folder")]
    if manifest is None:
        manifest = StateDir(root).read_manifest()
    problems: list[Problem] = []
    if manifest is not None:
        if not manifest.complete:
            problems.append(Problem("manifest.json", "a fetch stopped while publishing files; run the fetch again"))
        for name, rec in manifest.files.items():
            path = root / name
            if not path.is_file():
                problems.append(Problem(name, "is missing"))
            elif path.stat().st_size != rec.size:
                problems.append(Problem(name, f"has {path.stat().st_size} bytes, the manifest says {rec.size}"))
        if problems:
            return problems

    cfg: dict[str, Any] | None = None
    for name in (CONFIG, PREPROCESSOR):
        path = root / name
        if not path.is_file():
            problems.append(Problem(name, "is missing"))
            continue
        try:
            data = read_json_object(path)
        except (OSError, ValueError) as exc:
            problems.append(Problem(name, str(exc)))
            continue
        if name == CONFIG:
            cfg = data
            if reason := config_problem(data):
                problems.append(Problem(name, reason))
                cfg = None

    weights: list[str] = []
    if (root / SINGLE).is_file():
        weights = [SINGLE]
    elif (root / INDEX).is_file():
        try:
            weights = shards_from_index(read_json_object(root / INDEX))
        except (OSError, ValueError) as exc:
            problems.append(Problem(INDEX, str(exc)))
    else:
        problems.append(Problem(SINGLE, f"is missing (and there is no {INDEX})"))

    tensors: dict[str, TensorInfo] = {}
    for name in weights:
        path = root / name
        if not path.is_file():
            problems.append(Problem(name, f"is missing (named by {INDEX})"))
            continue
        try:
            tensors.update(read_header(path))
        except (OSError, SafetensorsError) as exc:
            problems.append(Problem(name, str(exc)))
    if cfg is not None and tensors and not problems and (reason := tensor_mismatch(cfg, tensors)):
        problems.append(Problem(CONFIG, reason))
    return problems


def validate_dinov3(dino_root: str | Path) -> bool:
    """True if ``dino_root`` holds a complete DINOv3 checkpoint that transformers can load.

    Checks what the seed lists (config.json, preprocessor_config.json, non-empty weights) and more: both JSON
    files parse and the config is DINOv3; every safetensors header is well formed and accounts exactly for its
    file's size; a sharded checkpoint has every shard its index names; the tensors agree with the config; and,
    where this tool wrote a manifest, the publish completed and every file has its recorded size.
    Reads headers only, never the whole weights (``dinov3-fetcher verify --deep`` re-hashes them).

    Never raises for a bad or missing directory, or hostile files in it: it returns False.
    """
    try:
        return not find_problems(Path(dino_root))
    except (OSError, ValueError, RecursionError):
        return False
