"""Small (and big) synthetic DINOv3 checkpoints for tests, stdlib only (no torch, no numpy).

Tensor names and shapes are the real ones of the Hub repositories (``facebook/dinov3-*``, written by
transformers 4.56: ``layer.N.*`` / ``stages.N.*`` without the ``model.`` prefix that transformers 5
adds on load). Tensor data is deterministic pseudo-random bytes (F32 values may be NaN/inf; only the
bytes matter for a downloader).

- ``safetensors_bytes`` builds a whole file in memory (small checkpoints).
- ``write_safetensors`` / ``big_vit_repo_dir`` stream to disk from a repeated 1 MiB seeded block, with a
  per-tensor start offset and prefix, so a 1.2 GB ViT-L file is written at disk speed.
- ``read_safetensors_header`` parses a header back (for assertions).
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path
from typing import Any, BinaryIO

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}
MIB = 1 << 20

PREPROCESSOR_CONFIG: dict[str, object] = {
    "image_processor_type": "DINOv3ViTImageProcessorFast",
    "do_resize": True,
    "size": {"height": 224, "width": 224},
    "resample": 2,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

GITATTRIBUTES = b"""*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

LICENSE_MD = b"# DINOv3 License\n\nTest fixture standing in for the DINOv3 license text.\n"


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= d
    return n


def _header(tensors: TensorSpec, metadata: dict[str, str] | None) -> tuple[bytes, list[tuple[str, int]]]:
    """Return (8-byte length + padded JSON header, [(name, nbytes)] in file order)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    layout: list[tuple[str, int]] = []
    offset = 0
    for name in sorted(tensors):
        dtype, shape = tensors[name]
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        layout.append((name, n))
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, layout


def safetensors_bytes(
    tensors: TensorSpec, *, seed: int = 0, metadata: dict[str, str] | None = None
) -> bytes:
    """A complete safetensors file in memory; tensors in sorted-name order, random data from ``seed``."""
    head, layout = _header(tensors, metadata)
    total = sum(n for _, n in layout)
    return head + random.Random(seed).randbytes(total)


def _filler_block(seed: int) -> bytes:
    block = random.Random(f"dinov3-filler-{seed}").randbytes(MIB)
    return block + block  # doubled so any rotation of the block is a contiguous slice


def _write_tensor_data(f: BinaryIO, name: str, n: int, seed: int, block2: memoryview) -> None:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    prefix = digest[: min(32, n)]
    f.write(prefix)
    left = n - len(prefix)
    start = int.from_bytes(digest[:4], "little") % MIB
    piece = block2[start : start + MIB]
    while left >= MIB:
        f.write(piece)
        left -= MIB
    if left:
        f.write(piece[:left])


class _Hashing:
    """A write-only file that also feeds every byte to a sha256 (so a big file is never read back to hash it)."""

    def __init__(self, f: BinaryIO, sha: Any) -> None:
        self.f, self.sha = f, sha

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        return self.f.write(data)


def write_safetensors(
    path: Path, tensors: TensorSpec, *, seed: int = 0, metadata: dict[str, str] | None = None
) -> str:
    """Stream a safetensors file to ``path``; returns its sha256. A tensor's bytes depend only on (seed, name,
    size)."""
    head, layout = _header(tensors, metadata)
    block2 = memoryview(_filler_block(seed))
    sha = hashlib.sha256()
    with open(path, "wb", buffering=0) as raw:
        f: Any = _Hashing(raw, sha)
        f.write(head)
        for name, n in layout:
            _write_tensor_data(f, name, n, seed, block2)
    return sha.hexdigest()


def read_safetensors_header(data: bytes | Path) -> tuple[int, dict[str, Any]]:
    """Return (header length, parsed header) of a safetensors file given as bytes or a path."""
    if isinstance(data, Path):
        with open(data, "rb") as f:
            data = f.read(8)
            (n,) = struct.unpack("<Q", data)
            return n, json.loads(f.read(n))
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def vit_tensors(
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    registers: int = 4,
    patch: int = 16,
    channels: int = 3,
    gated_mlp: bool = False,
    qv_bias: bool = True,
) -> TensorSpec:
    """DINOv3 ViT tensors as in the Hub's model.safetensors (ViT-S/B: 211, S+: 235, L: 415)."""
    d, i = hidden, intermediate
    t: TensorSpec = {
        "embeddings.cls_token": ("F32", (1, 1, d)),
        "embeddings.mask_token": ("F32", (1, 1, d)),
        "embeddings.register_tokens": ("F32", (1, registers, d)),
        "embeddings.patch_embeddings.weight": ("F32", (d, channels, patch, patch)),
        "embeddings.patch_embeddings.bias": ("F32", (d,)),
        "norm.weight": ("F32", (d,)),
        "norm.bias": ("F32", (d,)),
    }
    for n in range(layers):
        p = f"layer.{n}."
        for norm in ("norm1", "norm2"):
            t[p + norm + ".weight"] = ("F32", (d,))
            t[p + norm + ".bias"] = ("F32", (d,))
        for proj in ("q", "k", "v", "o"):
            t[f"{p}attention.{proj}_proj.weight"] = ("F32", (d, d))
            if proj == "o" or (proj in "qv" and qv_bias):
                t[f"{p}attention.{proj}_proj.bias"] = ("F32", (d,))
        t[p + "layer_scale1.lambda1"] = ("F32", (d,))
        t[p + "layer_scale2.lambda1"] = ("F32", (d,))
        ups = ("gate_proj", "up_proj") if gated_mlp else ("up_proj",)
        for up in ups:
            t[f"{p}mlp.{up}.weight"] = ("F32", (i, d))
            t[f"{p}mlp.{up}.bias"] = ("F32", (i,))
        t[p + "mlp.down_proj.weight"] = ("F32", (d, i))
        t[p + "mlp.down_proj.bias"] = ("F32", (d,))
    return t


def convnext_tensors(
    depths: tuple[int, ...] = (1, 1, 1, 1),
    hidden_sizes: tuple[int, ...] = (8, 16, 32, 64),
    channels: int = 3,
) -> TensorSpec:
    """DINOv3 ConvNeXt tensors (transformers' DINOv3ConvNextModel, checkpoint names without ``model.``)."""
    t: TensorSpec = {}
    for s, (depth, c) in enumerate(zip(depths, hidden_sizes, strict=True)):
        p = f"stages.{s}."
        if s == 0:
            t[p + "downsample_layers.0.weight"] = ("F32", (c, channels, 4, 4))
            t[p + "downsample_layers.0.bias"] = ("F32", (c,))
            t[p + "downsample_layers.1.weight"] = ("F32", (c,))
            t[p + "downsample_layers.1.bias"] = ("F32", (c,))
        else:
            prev = hidden_sizes[s - 1]
            t[p + "downsample_layers.0.weight"] = ("F32", (prev,))
            t[p + "downsample_layers.0.bias"] = ("F32", (prev,))
            t[p + "downsample_layers.1.weight"] = ("F32", (c, prev, 2, 2))
            t[p + "downsample_layers.1.bias"] = ("F32", (c,))
        for j in range(depth):
            q = f"{p}layers.{j}."
            t[q + "depthwise_conv.weight"] = ("F32", (c, 1, 7, 7))
            t[q + "depthwise_conv.bias"] = ("F32", (c,))
            t[q + "layer_norm.weight"] = ("F32", (c,))
            t[q + "layer_norm.bias"] = ("F32", (c,))
            t[q + "pointwise_conv1.weight"] = ("F32", (4 * c, c))
            t[q + "pointwise_conv1.bias"] = ("F32", (4 * c,))
            t[q + "pointwise_conv2.weight"] = ("F32", (c, 4 * c))
            t[q + "pointwise_conv2.bias"] = ("F32", (c,))
            t[q + "gamma"] = ("F32", (c,))
    t["layer_norm.weight"] = ("F32", (hidden_sizes[-1],))
    t["layer_norm.bias"] = ("F32", (hidden_sizes[-1],))
    return t


def vit_config(
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 2,
    registers: int = 4,
    patch: int = 16,
    gated_mlp: bool = False,
    **extra: object,
) -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["DINOv3ViTModel"],
        "model_type": "dinov3_vit",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "patch_size": patch,
        "image_size": 224,
        "num_channels": 3,
        "num_register_tokens": registers,
        "hidden_act": "silu" if gated_mlp else "gelu",
        "use_gated_mlp": gated_mlp,
        "rope_theta": 100.0,
        "pos_embed_rescale": 2.0,
        "pos_embed_shift": None,
        "pos_embed_jitter": None,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-05,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "query_bias": True,
        "key_bias": False,
        "value_bias": True,
        "proj_bias": True,
        "mlp_bias": True,
        "torch_dtype": "float32",
        "transformers_version": "4.56.0.dev0",
    }
    cfg.update(extra)
    return cfg


def convnext_config(
    depths: tuple[int, ...] = (1, 1, 1, 1), hidden_sizes: tuple[int, ...] = (8, 16, 32, 64), **extra: object
) -> dict[str, object]:
    cfg: dict[str, object] = {
        "architectures": ["DINOv3ConvNextModel"],
        "model_type": "dinov3_convnext",
        "depths": list(depths),
        "hidden_sizes": list(hidden_sizes),
        "num_channels": 3,
        "hidden_act": "gelu",
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-06,
        "layer_scale_init_value": 1e-06,
        "drop_path_rate": 0.0,
        "image_size": 224,
        "torch_dtype": "float32",
        "transformers_version": "4.56.0.dev0",
    }
    cfg.update(extra)
    return cfg


def _json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _model_card(model_type: str) -> bytes:
    return (
        f"---\nlibrary_name: transformers\nlicense: other\nlicense_name: dinov3-license\n"
        f"pipeline_tag: image-feature-extraction\ntags:\n- dinov3\n---\n\n"
        f"# Test {model_type} checkpoint\n\nA synthetic DINOv3 checkpoint with random weights, for tests.\n"
    ).encode()


def _common_files(config: dict[str, object], model: bytes, seed: int) -> dict[str, bytes]:
    return {
        "config.json": _json(config),
        "preprocessor_config.json": _json(PREPROCESSOR_CONFIG),
        "model.safetensors": model,
        "README.md": _model_card(str(config["model_type"])),
        "LICENSE.md": LICENSE_MD,
        ".gitattributes": GITATTRIBUTES,
        "model.pth": b"PK\x03\x04" + random.Random(seed + 1).randbytes(4092),
    }


def vit_repo_files(
    seed: int = 0,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 2,
    registers: int = 4,
    patch: int = 16,
    gated_mlp: bool = False,
    qv_bias: bool = True,
) -> dict[str, bytes]:
    tensors = vit_tensors(hidden, intermediate, layers, registers, patch, 3, gated_mlp, qv_bias)
    config = vit_config(hidden, intermediate, layers, heads, registers, patch, gated_mlp,
                        query_bias=qv_bias, value_bias=qv_bias)
    return _common_files(config, safetensors_bytes(tensors, seed=seed), seed)


def convnext_repo_files(
    seed: int = 0, depths: tuple[int, ...] = (1, 1, 1, 1), hidden_sizes: tuple[int, ...] = (8, 16, 32, 64)
) -> dict[str, bytes]:
    tensors = convnext_tensors(depths, hidden_sizes)
    return _common_files(convnext_config(depths, hidden_sizes), safetensors_bytes(tensors, seed=seed), seed)


def _split(layout: list[tuple[str, int]], n_shards: int) -> list[list[str]]:
    """Split names (file order) into n_shards contiguous groups of roughly equal byte size."""
    total = sum(n for _, n in layout) or 1
    groups: list[list[str]] = [[] for _ in range(n_shards)]
    acc = 0
    for name, n in layout:
        k = min(n_shards - 1, acc * n_shards // total)
        groups[k].append(name)
        acc += n
    return groups


def _shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def shard_files(files: dict[str, bytes], n_shards: int) -> dict[str, bytes]:
    """Replace model.safetensors by n shards (same tensor bytes) plus model.safetensors.index.json."""
    data = files["model.safetensors"]
    hlen, header = read_safetensors_header(data)
    base = 8 + hlen
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    layout = sorted(((k, v["data_offsets"]) for k, v in entries.items()), key=lambda kv: kv[1][0])
    groups = _split([(k, e - b) for k, (b, e) in layout], n_shards)
    out = {k: v for k, v in files.items() if k != "model.safetensors"}
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(groups):
        spec = {nm: (entries[nm]["dtype"], tuple(entries[nm]["shape"])) for nm in names}
        head, shard_layout = _header(spec, None)
        body = b"".join(
            data[base + entries[nm]["data_offsets"][0] : base + entries[nm]["data_offsets"][1]]
            for nm, _ in shard_layout
        )
        out[_shard_name(k, n_shards)] = head + body
        total += len(body)
        weight_map.update(dict.fromkeys(names, _shard_name(k, n_shards)))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    out["model.safetensors.index.json"] = _json(index)
    return out


def big_vit_repo_dir(
    dest: Path, *, hidden: int = 1024, intermediate: int = 4096, layers: int = 24, seed: int = 0,
    n_shards: int = 1, heads: int | None = None, gated_mlp: bool = False, qv_bias: bool = True,
    sha256s: dict[str, str] | None = None,
) -> Path:
    """Write a ViT repo (ViT-L/16 shapes by default, 1.2 GB) to ``dest``; returns ``dest``. The ViT-7B/16:
    ``hidden=4096, intermediate=8192, layers=40, heads=32, gated_mlp=True, qv_bias=False, n_shards=6`` (26.9 GB,
    streamed to disk). ``sha256s``, when given, receives each weight file's sha256, computed while writing."""
    dest.mkdir(parents=True, exist_ok=True)
    tensors = vit_tensors(hidden, intermediate, layers, gated_mlp=gated_mlp, qv_bias=qv_bias)
    config = vit_config(hidden, intermediate, layers, heads=heads or max(1, hidden // 64), gated_mlp=gated_mlp,
                        query_bias=qv_bias, value_bias=qv_bias)
    hashes = sha256s if sha256s is not None else {}
    for name, content in _common_files(config, b"", seed).items():
        if name not in ("model.safetensors", "model.pth"):
            (dest / name).write_bytes(content)
    if n_shards <= 1:
        hashes["model.safetensors"] = write_safetensors(dest / "model.safetensors", tensors, seed=seed)
        return dest
    _, layout = _header(tensors, None)
    weight_map: dict[str, str] = {}
    for k, names in enumerate(_split(layout, n_shards)):
        name = _shard_name(k, n_shards)
        hashes[name] = write_safetensors(dest / name, {nm: tensors[nm] for nm in names}, seed=seed)
        weight_map.update(dict.fromkeys(names, name))
    index = {"metadata": {"total_size": sum(n for _, n in layout)},
             "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_bytes(_json(index))
    return dest
