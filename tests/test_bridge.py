"""dinov3_bridge: the seed's ``DinoV3Teacher(DinoV3Config(root=...), device)`` on tiny DINOv3 checkpoints.

The checkpoints are the tiny ViT / ConvNeXt of tests/checkpoints.py with finite weights (seeded normal float32
instead of random bytes, which decode to NaN/inf now and then), served by the Hub emulator and fetched, then
run on CPU. Reference outputs come from transformers' own ``AutoModel`` on the same folder. Tests needing the
[load] extra (torch, transformers >= 4.56) are skipped, with the reason, when it is absent: install it with
``bash .ci/install-load-extra.sh``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from checkpoints import convnext_repo_files, read_safetensors_header, vit_repo_files
from conftest import cli_env, needs_load
from dinov3_bridge.config import DinoV3Config
from dinov3_fetcher import VerificationError, fetch_dinov3
from hub_server import HubServer

# torch and transformers are imported into the test process here: under pytest-xdist one worker runs this module
# and the other that does the same (test_load.py, test_bridge.py), so only one worker pays that import.
pytestmark = pytest.mark.xdist_group("torch-in-process")

VIT = "tiny-org/dinov3-vit-finite"
CONVNEXT = "tiny-org/dinov3-convnext-finite"
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _finite(files: dict[str, bytes], seed: int = 0) -> dict[str, bytes]:
    """The same repo with the (all F32) tensor data replaced by seeded N(0, 0.1) floats: finite outputs."""
    import numpy as np

    data = files["model.safetensors"]
    hlen, header = read_safetensors_header(data)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    n = (len(data) - 8 - hlen) // 4
    body = (np.random.default_rng(seed).standard_normal(n) * 0.1).astype("<f4").tobytes()
    return {**files, "model.safetensors": data[: 8 + hlen] + body}


@pytest.fixture
def vit_files(hub: HubServer) -> dict[str, bytes]:
    files = _finite(vit_repo_files())
    hub.add_repo(VIT, files)
    return files


@pytest.fixture
def vit_root(vit_files: dict[str, bytes], dino_root: Path, hub: HubServer) -> Path:
    """dino_root holding the finite tiny ViT (hidden 32, 2 blocks, 2 heads, 4 registers), fetched."""
    path = fetch_dinov3(dino_root, VIT)
    hub.clear()
    return path


def _reference(root: Path) -> Any:
    import transformers

    return transformers.AutoModel.from_pretrained(str(root), local_files_only=True).eval()


def _split(tokens: Any, registers: int, gh: int, gw: int) -> tuple[Any, Any, Any, Any]:
    """transformers' tokens split by hand: 1 CLS, R registers, patches row-major."""
    cls, regs, patches = tokens[:, 0], tokens[:, 1 : 1 + registers], tokens[:, 1 + registers :]
    grid = patches.reshape(tokens.shape[0], gh, gw, tokens.shape[-1]).permute(0, 3, 1, 2)
    return cls, regs, patches, grid


def _assert_split(feats: Any, tokens: Any, registers: int, gh: int, gw: int) -> None:
    import torch

    cls, regs, patches, grid = _split(tokens, registers, gh, gw)
    torch.testing.assert_close(feats.cls_token, cls)
    torch.testing.assert_close(feats.register_tokens, regs)
    torch.testing.assert_close(feats.patch_tokens, patches)
    torch.testing.assert_close(feats.patch_grid, grid)
    assert feats.patch_grid.shape == (tokens.shape[0], tokens.shape[-1], gh, gw)


# --- config: no torch, paths -----------------------------------------------------------------------------------


def test_config_imports_without_torch() -> None:
    code = ("import sys, dinov3_bridge, dinov3_bridge.config; from dinov3_bridge.config import DinoV3Config;"
            "DinoV3Config(root='dinov3');"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules);"
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_relative_root_is_the_working_directory_or_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = DinoV3Config(root="dinov3")
    assert (cfg.model_name, cfg.revision, cfg.fetch, cfg.dtype, cfg.shared_fs, cfg.layers) == (
        None, None, True, None, False, None)  # the revision: the source's default branch
    assert cfg.resolved_root == tmp_path / "dinov3"
    assert DinoV3Config(root="dinov3", base=tmp_path / "conf").resolved_root == tmp_path / "conf" / "dinov3"
    assert DinoV3Config(root=tmp_path / "abs", base="/elsewhere").resolved_root == tmp_path / "abs"
    conf = tmp_path / "conf" / "config.json"
    conf.parent.mkdir()
    conf.write_text(json.dumps({"train": {"dino_root": "../models/dinov3", "dino_model": VIT,
                                          "dino_source": "modelscope"}}))
    from_file = DinoV3Config.from_pipeline_config(conf, fetch=False)
    assert from_file.resolved_root == tmp_path / "models" / "dinov3"  # as dinov3-fetcher --config resolves it
    assert (from_file.model_name, from_file.fetch, from_file.source) == (VIT, False, "modelscope")
    assert from_file.revision is None  # not in the config: the source's default branch (master on ModelScope)
    with pytest.raises(ValueError, match="non-empty"):
        DinoV3Config(root="  ")
    with pytest.raises(ValueError, match="dtype"):
        DinoV3Config(root="x", dtype="int8")
    with pytest.raises(ValueError, match="layers"):
        DinoV3Config(root="x", layers=[1.5])  # type: ignore[list-item]


# --- the teacher ------------------------------------------------------------------------------------------------


@needs_load
def test_teacher_fetches_and_splits_last_hidden_state(hub: HubServer, vit_files: dict[str, bytes],
                                                      dino_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Output, DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=dino_root, model_name=VIT), "cpu")
    assert hub.bytes_served("model.safetensors") == len(vit_files["model.safetensors"])
    assert (teacher.embed_dim, teacher.patch_size, teacher.num_register_tokens) == (32, 16, 4)
    assert teacher.image_size == (224, 224) and teacher.device == torch.device("cpu")
    assert isinstance(teacher, torch.nn.Module) and teacher.dtype == torch.float32

    images = torch.randint(0, 256, (2, 300, 200, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pixels = teacher.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    out = teacher(pixels)
    assert isinstance(out, DinoV3Output)
    assert out.cls_token.shape == (2, 32) and out.register_tokens.shape == (2, 4, 32)
    assert out.patch_tokens.shape == (2, 196, 32) and out.patch_grid.shape == (2, 32, 14, 14)
    assert torch.isfinite(out.patch_tokens).all()
    with torch.no_grad():
        ref = _reference(dino_root)(pixel_values=pixels).last_hidden_state
    _assert_split(out, ref, 4, 14, 14)
    torch.testing.assert_close(out.patch_grid[:, :, 3, 5], out.patch_tokens[:, 3 * 14 + 5])  # row-major
    assert out.layers == {}


@needs_load
def test_intermediate_layers_are_split_the_same_way(vit_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root, layers=[0]), "cpu")
    raw = DinoV3Teacher(DinoV3Config(root=vit_root, layer_norm=False), "cpu")
    pixels = teacher.preprocess(torch.randint(0, 256, (2, 64, 96, 3), dtype=torch.uint8))
    ref_model = _reference(vit_root)
    with torch.no_grad():
        ref = ref_model(pixel_values=pixels, output_hidden_states=True)
    assert len(ref.hidden_states) == 3  # embeddings, block 0, block 1

    out = teacher(pixels, layers=[0, -1])
    assert list(out.layers) == [0, -1]
    _assert_split(out.layers[0], ref_model.norm(ref.hidden_states[1]), 4, 14, 14)
    _assert_split(out.layers[-1], ref.last_hidden_state, 4, 14, 14)  # normed last block = the output
    assert list(teacher(pixels).layers) == [0]  # cfg.layers is the default
    raw_out = raw(pixels, layers=[1, 0])
    _assert_split(raw_out.layers[0], ref.hidden_states[1], 4, 14, 14)
    _assert_split(raw_out.layers[1], ref.hidden_states[2], 4, 14, 14)
    with pytest.raises(ValueError, match=r"layer 2 does not exist: this teacher has 2 blocks"):
        teacher(pixels, layers=[2])


@needs_load
def test_any_multiple_of_the_patch_size_and_a_clear_error_otherwise(vit_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    ref_model = _reference(vit_root)
    pixels = torch.randn(1, 3, 256, 384, generator=torch.Generator().manual_seed(2))
    out = teacher(pixels)
    assert out.patch_tokens.shape == (1, 16 * 24, 32) and out.patch_grid.shape == (1, 32, 16, 24)
    with torch.no_grad():
        _assert_split(out, ref_model(pixel_values=pixels).last_hidden_state, 4, 16, 24)
    with pytest.raises(ValueError) as info:
        teacher(torch.zeros(1, 3, 250, 384))
    text = str(info.value)
    assert "250x384" in text and "multiples of the patch size 16" in text
    assert "240x384" in text and "256x384" in text  # the fix: crop/resize down, or pad up
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        teacher(torch.zeros(3, 224, 224))


@needs_load
def test_raw_images_and_an_empty_batch_are_refused_with_the_fix(vit_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError) as info:  # preprocess forgotten: 0..255 values would give wrong features
        teacher(images)
    assert "pixel_values are uint8" in str(info.value) and "teacher.preprocess(images)" in str(info.value)
    out = teacher(teacher.preprocess(images))  # the fix it names works
    assert out.patch_tokens.shape == (2, 196, 32)
    with pytest.raises(ValueError, match="a batch of 0"):
        teacher(torch.zeros(0, 3, 224, 224))
    with pytest.raises(ValueError, match="a batch of 0"):
        teacher.preprocess(torch.zeros(0, 224, 224, 3, dtype=torch.uint8))


@needs_load
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_float_images_that_were_not_normalized_are_refused_with_the_fix(vit_root: Path, dtype: str) -> None:
    """0..255 floats (preprocess forgotten, or only a cast) give features of wrong values: refused like uint8;
    normalized pixels pass, up to the edges of any DINOv3 normalization (SAT-493M's reaches 4.92)."""
    import torch

    from dinov3_bridge.model import DinoV3Teacher, pixel_limit

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    raw = images.to(getattr(torch, dtype))
    for wrong in (raw, raw - 127.5, raw.sub(0.485 * 255).div(0.229)):  # raw, centred only, normalized unrescaled
        with pytest.raises(ValueError) as info:
            teacher(wrong)
        assert "not normalized images" in str(info.value) and "teacher.preprocess(images)" in str(info.value)
        assert "+/-2.64" in str(info.value) and "beyond 10 is refused" in str(info.value)
    assert pixel_limit(MEAN, STD) == 10.0
    assert pixel_limit((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)) == 10.0  # SAT-493M's reaches 4.92
    out = teacher(teacher.preprocess(images))  # the fix it names works
    assert out.patch_tokens.shape == (2, 196, 32)
    edge = torch.full((1, 3, 224, 224), 4.92)  # the farthest SAT-493M's normalization goes, and beyond by 2x
    assert teacher(edge).patch_tokens.shape == (1, 196, 32)
    assert teacher(-2 * edge).patch_tokens.shape == (1, 196, 32)


@needs_load
def test_preprocess_takes_a_flipped_view_as_opencvs_bgr_to_rgb_gives_it(vit_root: Path) -> None:
    import numpy as np
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    bgr = np.random.default_rng(4).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    rgb_view = bgr[..., ::-1]  # a negative stride, no copy
    assert rgb_view.strides[-1] < 0
    got = teacher.preprocess(rgb_view)
    assert torch.equal(got, teacher.preprocess(np.ascontiguousarray(rgb_view)))
    assert torch.equal(teacher.preprocess([rgb_view, rgb_view[::-1]])[:1], got)


@needs_load
def test_frozen_and_eval_even_inside_a_training_parent(vit_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    class Distiller(torch.nn.Module):
        def __init__(self, teacher: DinoV3Teacher) -> None:
            super().__init__()
            self.teacher = teacher
            self.student = torch.nn.Conv2d(3, 32, kernel_size=16, stride=16)

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    parent = Distiller(teacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    parent.requires_grad_(True)  # torch sets the flag on every parameter below, the teacher's included
    parent.train()  # ... and the teacher's train() re-freezes them
    assert parent.training and parent.student.training
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in parent.student.parameters())
    parent.requires_grad_(True)  # flipped again: forward's no_grad still keeps gradients out (below)

    pixels = teacher.preprocess(torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8))
    with torch.enable_grad():
        target = teacher(pixels)
        assert not target.patch_grid.requires_grad and target.patch_grid.grad_fn is None
        loss = torch.nn.functional.mse_loss(parent.student(pixels), target.patch_grid)
        loss.backward()
    assert parent.student.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # eval matters: in train mode DINOv3 jitters/rescales its RoPE coordinates (pos_embed_rescale=2.0)
    with torch.no_grad():
        train_mode = _reference(vit_root).train()(pixel_values=pixels).last_hidden_state
        torch.manual_seed(0)
        again = teacher(pixels).last_hidden_state
    torch.testing.assert_close(again, target.last_hidden_state)
    assert not torch.allclose(train_mode, target.last_hidden_state)


@needs_load
def test_bfloat16(vit_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root, dtype="bf16"), "cpu")
    assert teacher.dtype == torch.bfloat16
    pixels = teacher.preprocess(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert pixels.dtype == torch.bfloat16
    out = teacher(pixels, layers=[0])
    assert out.patch_grid.dtype == torch.bfloat16 and out.layers[0].cls_token.dtype == torch.bfloat16
    assert DinoV3Teacher(DinoV3Config(root=vit_root, dtype=torch.float16), "cpu").dtype == torch.float16


def _pil_bilinear_weights(in_size: int, out_size: int) -> Any:
    """PIL's (and torchvision's antialiased) bilinear resampling matrix (out_size, in_size): a triangle filter
    whose support widens by the scale factor when shrinking, centres at (i + 0.5) * scale."""
    import numpy as np

    scale = in_size / out_size
    support = max(scale, 1.0)
    w = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        j = np.arange(lo, hi)
        k = np.clip(1.0 - np.abs((j - center + 0.5) / support), 0.0, None)
        w[i, lo:hi] = k / k.sum()
    return w


def _documented_preprocess(image: Any, size: tuple[int, int]) -> Any:
    """What transformers' DINOv3 processor documents (preprocessor_config.json): resize bilinear to ``size``
    (antialiased, result rounded to uint8 as the processor's uint8 path gives it), rescale 1/255, normalize."""
    import numpy as np

    x = image.astype(np.float64)
    rows, cols = _pil_bilinear_weights(x.shape[0], size[0]), _pil_bilinear_weights(x.shape[1], size[1])
    resized = np.tensordot(np.tensordot(rows, x, axes=(1, 0)), cols, axes=(1, 1)).transpose(0, 2, 1)  # (o, p, c)
    resized = np.clip(np.round(resized), 0, 255)
    return ((resized / 255 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)


@needs_load
def test_preprocess_matches_the_processors_math_within_one_grey_level(vit_root: Path) -> None:
    """transformers' DINOv3ViTImageProcessorFast needs torchvision, which this torch cannot import beside it,
    so the reference is its documented math, written out independently above (numpy, float64)."""
    import numpy as np
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:200]
    smooth = np.stack([yy * 255 / 299, xx * 255 / 199, (yy + xx) * 255 / 498], axis=-1)
    for image in (np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8),  # shrink
                  rng.integers(0, 256, (150, 100, 3), dtype=np.uint8),  # enlarge, pure noise
                  rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)):  # no resize
        want = _documented_preprocess(image, (224, 224))
        got = teacher.preprocess(torch.from_numpy(image))[0].double().numpy()
        grey_levels = np.abs(got - want) * np.array(STD)[:, None, None] * 255
        assert grey_levels.max() <= 1.0, grey_levels.max()
        np.testing.assert_allclose(teacher.preprocess(image)[0].numpy(), got, atol=1e-5)  # array = tensor
    batch = rng.integers(0, 256, (2, 3, 120, 80), dtype=np.uint8)  # NCHW batch, float in [0, 1] too
    got = teacher.preprocess(torch.from_numpy(batch))
    assert got.shape == (2, 3, 224, 224)
    torch.testing.assert_close(teacher.preprocess(torch.from_numpy(batch).float() / 255), got)
    torch.testing.assert_close(teacher.preprocess([batch[0], batch[1].transpose(1, 2, 0)]), got)


@needs_load
def test_fetch_false_touches_no_network(hub: HubServer, vit_root: Path, tmp_path: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    teacher = DinoV3Teacher(DinoV3Config(root=vit_root, model_name=VIT, fetch=False), "cpu")
    teacher(torch.zeros(1, 3, 32, 32))
    DinoV3Teacher(DinoV3Config(root=vit_root), "cpu")  # fetch=True, complete: no request either
    with pytest.raises(VerificationError, match="not a complete DINOv3 checkpoint"):
        DinoV3Teacher(DinoV3Config(root=tmp_path / "empty", model_name=VIT, fetch=False), "cpu")
    (vit_root / "model.safetensors").unlink()
    with pytest.raises(VerificationError, match="not a complete DINOv3 checkpoint"):
        DinoV3Teacher(DinoV3Config(root=vit_root, fetch=False), "cpu")
    assert hub.requests == []
    DinoV3Teacher(DinoV3Config(root=vit_root, model_name=VIT), "cpu")  # fetch=True repairs it
    assert len(hub.file_gets("model.safetensors")) >= 1


@needs_load
def test_convnext_gives_a_feature_map(hub: HubServer, dino_root: Path) -> None:
    import torch

    from dinov3_bridge.model import DinoV3Teacher

    hub.add_repo(CONVNEXT, _finite(convnext_repo_files(depths=(1, 1, 2, 1), hidden_sizes=(8, 16, 32, 32))))
    teacher = DinoV3Teacher(DinoV3Config(root=dino_root, model_name=CONVNEXT), "cpu")
    assert (teacher.embed_dim, teacher.patch_size, teacher.num_register_tokens) == (32, 32, 0)
    pixels = torch.randn(2, 3, 224, 288, generator=torch.Generator().manual_seed(4))
    out = teacher(pixels)
    assert out.patch_grid.shape == (2, 32, 7, 9) and out.register_tokens.shape == (2, 0, 32)
    with torch.no_grad():
        ref = _reference(dino_root)(pixel_values=pixels)
    _assert_split(out, ref.last_hidden_state, 0, 7, 9)
    torch.testing.assert_close(out.cls_token, ref.pooler_output)
    with pytest.raises(ValueError, match="multiples of the patch size 32"):
        teacher(torch.zeros(1, 3, 224, 240))
    with pytest.raises(ValueError, match="intermediate layers are for ViT"):
        teacher(pixels, layers=[0])


# --- GPU memory: refuse early with the numbers --------------------------------------------------------------------


@needs_load
def test_weight_estimate_and_the_memory_refusal(vit_root: Path, tmp_path: Path) -> None:
    from dinov3_bridge.model import TeacherMemoryError, check_device_memory, estimate_weight_bytes

    _, header = read_safetensors_header(vit_root / "model.safetensors")
    numel = sum(int(__import__("math").prod(v["shape"])) for k, v in header.items() if k != "__metadata__")
    assert estimate_weight_bytes(vit_root) == 4 * numel  # from the header, as stored (F32)
    assert estimate_weight_bytes(vit_root, dtype_name="bfloat16") == 2 * numel
    empty = tmp_path / "nothing"
    assert estimate_weight_bytes(empty) == 303_130_000 * 4  # the default ViT-L/16, before any download
    seven_b = estimate_weight_bytes(empty, "facebook/dinov3-vit7b16-pretrain-lvd1689m", "bfloat16")
    assert seven_b == 6_716_000_000 * 2
    assert estimate_weight_bytes(empty, "someone/unknown") is None

    gib = 2**30
    check_device_memory(seven_b, 16 * gib, device="cuda:0", dtype_name="bfloat16")  # 12.5 GiB x 1.1 fits
    with pytest.raises(TeacherMemoryError) as info:
        check_device_memory(seven_b * 2, 24 * gib, device="cuda:0", total=24 * gib)  # 7B in fp32 on a 24 GB card
    text = str(info.value)
    assert "weights need 25.02 GiB" in text and "only 24.00 GiB of 24.00 GiB is free" in text
    assert "dtype='bfloat16' (halves it: 12.51 GiB)" in text and "device_map='auto'" in text
    assert (info.value.needed, info.value.free) == (seven_b * 2, 24 * gib)
    with pytest.raises(TeacherMemoryError, match=r"need 12\.51 GiB in bfloat16.*only 8\.00 GiB"):
        check_device_memory(seven_b, 8 * gib, dtype_name="bfloat16")


# --- the seed's lines, verbatim, in a fresh environment ----------------------------------------------------------

SEED_SCRIPT = """\
import json, sys, types
import torch

config = types.SimpleNamespace(train=json.load(open("config.json"))["train"])
device = torch.device("cpu")

# --- SEED.md, "Integration", verbatim ---
from dinov3_bridge.model import DinoV3Teacher
from dinov3_bridge.config import DinoV3Config

cfg = DinoV3Config(root=config.train["dino_root"])
teacher = DinoV3Teacher(cfg, device)
# ---

import dinov3_bridge, dinov3_fetcher
out = teacher(teacher.preprocess(torch.zeros(224, 224, 3, dtype=torch.uint8)))
print(json.dumps({"grid": list(out.patch_grid.shape), "cls": list(out.cls_token.shape),
                  "files": [dinov3_bridge.__file__, dinov3_fetcher.__file__], "prefix": sys.prefix}))
"""


def _constraints(path: Path) -> Path:
    from importlib.metadata import version

    names = ("transformers", "tokenizers", "safetensors", "numpy", "huggingface_hub", "filelock", "regex",
             "pyyaml", "packaging", "tqdm", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec")
    lines = []
    for name in names:
        with contextlib.suppress(Exception):  # not installed: no constraint
            lines.append(f"{name}=={version(name)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_load
@pytest.mark.slow  # ~45 s on the shared dev machine (wheel build, venv, install from the uv cache, imports)
@pytest.mark.skipif(shutil.which("uv") is None, reason="uv is not on PATH (it builds the wheel and the venv)")
@pytest.mark.skipif(not list(Path("/opt/wheels").glob("torch-*.whl")),
                    reason="no torch wheel in /opt/wheels (the local CPU wheel store)")
def test_seed_lines_run_verbatim_in_a_fresh_environment(hub: HubServer, vit_root: Path, tmp_path: Path) -> None:
    """Wheel of this project + torch (local CPU wheel) + transformers in a new venv; nothing else, no src/."""
    import torch

    dist = tmp_path / "dist"
    subprocess.run(["uv", "build", "--wheel", "--out-dir", str(dist), str(ROOT)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = dist.glob("dinov3_fetcher-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(["uv", "venv", "--quiet", "--python", sys.executable, str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    torch_version = torch.__version__  # the local build, e.g. 2.13.0+cpu: never a CUDA wheel from the index
    proc = subprocess.run(["uv", "pip", "install", "--quiet", "--python", str(py), "--find-links", "/opt/wheels",
                           "--constraints", str(_constraints(tmp_path / "constraints.txt")),
                           f"{wheel}[load]", f"torch=={torch_version}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    project = tmp_path / "project"
    project.mkdir()
    shutil.move(str(vit_root), project / "dinov3")  # fetched from the emulator before; now the trainer's folder
    (project / "config.json").write_text(json.dumps({"train": {"dino_root": "dinov3"}}))
    (project / "train.py").write_text(SEED_SCRIPT)
    env = {k: v for k, v in cli_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    run = subprocess.run([str(py), "train.py"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["grid"] == [1, 32, 14, 14] and result["cls"] == [1, 32]
    assert all(f.startswith(str(venv)) for f in result["files"]), result  # the installed wheel, not src/
    assert hub.requests == []  # a complete dino_root: the default fetch=True asks the network nothing


# --- torchrun: the fetch happens once ------------------------------------------------------------------------------

WORKER = """\
import json, os, sys
from pathlib import Path

import torch
import torch.distributed as dist

from dinov3_bridge.config import DinoV3Config
from dinov3_bridge.model import DinoV3Teacher

out_dir, root, model = sys.argv[1:4]
dist.init_process_group("gloo")
teacher = DinoV3Teacher(DinoV3Config(root=root, model_name=model), torch.device("cpu"))
out = teacher(teacher.preprocess(torch.zeros(2, 64, 64, 3, dtype=torch.uint8)))
dist.barrier()
Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps({"grid": list(out.patch_grid.shape)}))
dist.destroy_process_group()
"""


@needs_load
@pytest.mark.slow  # ~30 s: two ranks each import torch and transformers
def test_torchrun_two_processes_fetch_once(hub: HubServer, vit_files: dict[str, bytes], tmp_path: Path,
                                           dino_root: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = cli_env(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
           str(out), str(dino_root), VIT]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    assert results == [{"grid": [2, 32, 14, 14]}] * 2
    weights = hub.file_gets("model.safetensors")
    assert len({r.path.partition("?")[0] for r in weights if r.host == "cdn"}) == 1
    assert hub.bytes_served("model.safetensors") == len(vit_files["model.safetensors"])  # once, not twice
    assert len(hub.file_gets("/config.json")) == 1
    assert len([r for r in hub.requests if r.path.startswith("/api/models/")]) == 1
    assert (dino_root / "model.safetensors").is_file()
