"""Is dino_root a complete, loadable DINOv3 checkpoint? Checks that read kilobytes, not gigabytes.

- config.json and preprocessor_config.json parse, and the config says DINOv3;
- the weights: model.safetensors, or model.safetensors.index.json plus every shard it names;
- every safetensors header is well formed and its offsets account exactly for the file's size;
- the tensors agree with the config (hidden size, layers, patch size, registers, MLP kind, ConvNeXt stages);
- with a manifest: it is complete, every file it lists is there with its recorded size, and none is one that
  ``verify --deep`` found altered (the manifest's ``damaged``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._layout import CONFIG, INDEX, PREPROCESSOR, SINGLE, read_json_object, weight_files
from ._manifest import Manifest
from ._registry import variant_for
from ._safetensors import SafetensorsError, TensorInfo, read_header

__all__ = ["Problem", "config_problem", "find_problems", "registry_mismatch", "tensor_mismatch",
           "validate_dinov3", "why_not"]

DAMAGED = "its bytes differ from the manifest's sha256 (found by verify --deep); a fetch re-downloads it"
DINOV3_MODEL_TYPES = frozenset({"dinov3_vit", "dinov3_convnext"})
_LAYER = re.compile(r"^layer\.(\d+)\.")
_STAGE_LAYER = re.compile(r"^stages\.(\d+)\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint folder: which file, and what."""
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


def config_problem(cfg: dict[str, Any]) -> str | None:
    """Why this config is not a DINOv3 config, or None."""
    model_type = cfg.get("model_type")
    if model_type not in DINOV3_MODEL_TYPES:
        return f"model_type is {model_type!r}, not a DINOv3 model (dinov3_vit or dinov3_convnext)"
    needed = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size") \
        if model_type == "dinov3_vit" else ("depths", "hidden_sizes")
    missing = [k for k in needed if k not in cfg]
    return f"config lacks {', '.join(missing)}" if missing else None


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
        from ._state import StateDir

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
            elif name in manifest.damaged:
                problems.append(Problem(name, DAMAGED))
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
    try:
        names = {n for n in (SINGLE, INDEX) if (root / n).is_file()}
        found = weight_files(names, lambda: read_json_object(root / INDEX))
        if found is None:
            problems.append(Problem(SINGLE, f"is missing (and there is no {INDEX})"))
        weights = found or []
    except (OSError, ValueError) as exc:
        problems.append(Problem(INDEX, str(exc)))

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


def why_not(root: Path, repo_id: str | None, revision: str, manifest: Manifest | None = None) -> str | None:
    """Why ``root`` is not a complete checkpoint of ``repo_id@revision`` (of any DINOv3 model when ``repo_id``
    is None), in words; None when it is one. The one explanation every command and API gives."""
    if not root.is_dir():
        return "it is not a folder" if root.exists() else "it does not exist"
    if manifest is None:
        from ._state import StateDir

        manifest = StateDir(root).read_manifest()
    if repo_id is not None:
        if manifest is None:
            return "it holds no checkpoint fetched by this tool (no manifest)"
        other_repo = manifest.repo_id.lower() != repo_id.lower()
        if other_repo or (manifest.complete and not manifest.matches(repo_id, revision)):
            return f"it holds {manifest.repo_id}@{manifest.revision}, not {repo_id}@{revision}"
    problems = find_problems(root, manifest)
    return "; ".join(str(p) for p in problems[:3]) or None
