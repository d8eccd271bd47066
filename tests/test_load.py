"""verify --load, check_load and load_teacher: tiny DINOv3 checkpoints built here, served by the Hub emulator,
fetched, then loaded with transformers and run on CPU.

Tests that need the [load] extra (torch + transformers >= 4.56) are skipped, with the reason, when it is
absent; install it with ``bash .ci/install-load-extra.sh`` (see DEVELOPERS.md). The error-message tests run
everywhere: they hide torch/transformers from the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from checkpoints import convnext_repo_files
from conftest import TINY, cli_env, needs_load
from dinov3_fetcher import _load as load
from dinov3_fetcher import fetch_dinov3
from dinov3_fetcher._errors import LoadError, VerificationError
from helpers import error_line, run_cli_here
from hub_server import HubServer

# torch and transformers are imported into the test process here: under pytest-xdist one worker runs this module
# and the other that does the same (test_load.py, test_bridge.py), so only one worker pays that import.
pytestmark = pytest.mark.xdist_group("torch-in-process")

CONVNEXT = "tiny-org/dinov3-convnext-tiny"
VIT_TOKENS = 1 + 4 + 196  # CLS + 4 registers + (224/16)^2 patches


@pytest.fixture
def fetched(tiny: dict[str, bytes], dino_root: Path) -> Path:
    """dino_root holding the tiny ViT (hidden 32, 2 layers), fetched from the emulator."""
    return fetch_dinov3(dino_root, TINY)


# --- without the extra: imports stay light, errors say what to install --------------------------------------


def test_importing_the_package_and_cli_does_not_import_torch() -> None:
    code = ("import sys, dinov3_fetcher._load, dinov3_fetcher._distributed, dinov3_fetcher._cli, "
            "dinov3_fetcher._commands;"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules);"
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_missing_torch_is_a_load_error_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(LoadError) as info:
        load.check_load("/nonexistent")
    assert "torch is not installed" in info.value.message
    assert "pip install 'dinov3-fetcher[load]'" in info.value.hint
    assert "install-load-extra.sh" in info.value.hint
    assert info.value.exit_code == 14


def test_missing_transformers_is_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(LoadError, match="transformers is not installed") as info:
        load._import_transformers()
    assert "dinov3-fetcher[load]" in info.value.hint


def test_old_transformers_is_named_with_the_keyerror_it_would_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace(__version__="4.55.4"))
    with pytest.raises(LoadError) as info:
        load._import_transformers()
    assert "transformers 4.55.4 is too old for DINOv3" in info.value.message
    assert "KeyError: 'dinov3_vit'" in info.value.message
    assert "transformers>=4.56" in info.value.hint


def test_verify_load_without_torch_exits_14_with_the_hint(fetched: Path, tmp_path: Path) -> None:
    """Through the real CLI, with a sitecustomize that makes `import torch` fail (as in the default install)."""
    blocker = tmp_path / "block_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
        "sys.meta_path.insert(0, _Block())\n")
    proc = subprocess.run([sys.executable, "-m", "dinov3_fetcher", "verify", "--dino-root", str(fetched), "--load"],
                          env=cli_env(PYTHONPATH=str(blocker)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 14, proc.stderr
    line = error_line(proc.stderr)
    assert "torch is not installed" in line
    assert "pip install 'dinov3-fetcher[load]'" in line
    assert "download.pytorch.org/whl/cpu" in line and "uv sync --extra load" not in line  # what works here


# --- with the extra: real transformers ------------------------------------------------------------------------


@needs_load
def test_check_load_tiny_vit(fetched: Path) -> None:
    info = load.check_load(fetched)
    assert info["model_class"] == "DINOv3ViTModel"
    assert info["model_type"] == "dinov3_vit"
    assert info["input_shape"] == [1, 3, 224, 224]
    assert info["output_shape"] == [1, VIT_TOKENS, 32]
    assert info["parameters"] > 32 * 32 * 4 * 2
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["load_seconds"] >= 0 and info["forward_seconds"] >= 0


@needs_load
def test_check_load_tiny_convnext(hub: HubServer, dino_root: Path) -> None:
    hub.add_repo(CONVNEXT, convnext_repo_files(depths=(1, 1, 2, 1), hidden_sizes=(8, 16, 32, 32)))
    info = load.check_load(fetch_dinov3(dino_root, CONVNEXT))
    assert info["model_class"] == "DINOv3ConvNextModel"
    assert info["output_shape"] == [1, 1 + 7 * 7, 32]  # pooled token + the 7x7 map of the last stage


@needs_load
def test_verify_load_through_the_cli(fetched: Path, run_cli: Any) -> None:
    # with a fractional HF_HUB_DOWNLOAD_TIMEOUT: transformers imports huggingface_hub, which reads it with int()
    # when it loads (the fetcher's import of both takes care of it)
    human = run_cli("verify", "--dino-root", str(fetched), "--load", HF_HUB_DOWNLOAD_TIMEOUT="1.5")
    assert human.returncode == 0, human.stderr
    assert "load: model_class DINOv3ViTModel" in human.stderr
    assert f"output_shape [1, {VIT_TOKENS}, 32]" in human.stderr
    code, stdout, _ = run_cli_here(["verify", "--dino-root", str(fetched), "--load", "--json"])  # the same, as JSON
    assert code == 0
    out = json.loads(stdout)
    assert out["ok"] is True
    assert out["load"]["model_class"] == "DINOv3ViTModel"
    assert out["load"]["output_shape"] == [1, VIT_TOKENS, 32]


@needs_load
def test_verify_load_unknown_device_exits_14(fetched: Path) -> None:
    code, _, stderr = run_cli_here(["verify", "--dino-root", str(fetched), "--load", "--device", "tpu-please"])
    assert code == 14, stderr
    assert "unknown device" in error_line(stderr)


@needs_load
def test_load_teacher_fetches_then_loads_from_disk(hub: HubServer, tiny: dict[str, bytes], dino_root: Path) -> None:
    import torch

    model, preprocess = load.load_teacher(dino_root, "cpu", model_name=TINY)
    assert len(hub.file_gets("model.safetensors")) >= 1
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    image = torch.randint(0, 256, (300, 200, 3), dtype=torch.uint8)
    pixels = preprocess(image)
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    with torch.no_grad():
        out = model(pixel_values=pixels)
    assert tuple(out.last_hidden_state.shape) == (1, VIT_TOKENS, 32)

    hub.clear()  # warm: neither the named model nor "whatever dino_root holds" touches the network
    load.load_teacher(dino_root, model_name=TINY)
    load.load_teacher(dino_root)
    assert hub.requests == []


@needs_load
def test_load_teacher_offline_refuses_an_incomplete_root(fetched: Path) -> None:
    (fetched / "model.safetensors").unlink()
    with pytest.raises(VerificationError, match="not a complete DINOv3 checkpoint"):
        load.load_teacher(fetched, fetch=False)


@needs_load
def test_load_teacher_offline_refuses_another_model(fetched: Path) -> None:
    with pytest.raises(VerificationError, match="not facebook/dinov3-vits16"):
        load.load_teacher(fetched, model_name="facebook/dinov3-vits16-pretrain-lvd1689m", fetch=False)


@needs_load
def test_load_teacher_bfloat16(fetched: Path) -> None:
    import torch

    model, preprocess = load.load_teacher(fetched, dtype=torch.bfloat16, fetch=False)
    pixels = preprocess(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert pixels.dtype == torch.bfloat16 and pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        assert model(pixel_values=pixels).last_hidden_state.dtype == torch.bfloat16


@needs_load
def test_preprocess_follows_preprocessor_config(fetched: Path) -> None:
    import numpy as np
    import torch

    pre = load.Preprocess.from_dir(fetched)
    grey = torch.full((100, 150, 3), 128, dtype=torch.uint8)
    out = pre(grey)
    assert out.shape == (1, 3, 224, 224)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (128 / 255 - mean) / std
    torch.testing.assert_close(out[0, :, 0, 0], want)
    torch.testing.assert_close(out.amin(dim=(0, 2, 3)), want)
    torch.testing.assert_close(out.amax(dim=(0, 2, 3)), want)
    # every layout gives the same pixels: HWC, CHW, batches, numpy, lists, float already in [0, 1]
    image = torch.randint(0, 256, (64, 48, 3), dtype=torch.uint8)
    ref = pre(image)
    torch.testing.assert_close(pre(image.permute(2, 0, 1)), ref)
    torch.testing.assert_close(pre(image[None]), ref)
    torch.testing.assert_close(pre(image.numpy()), ref)
    torch.testing.assert_close(pre(np.ascontiguousarray(image.numpy())), ref)
    torch.testing.assert_close(pre(image.permute(2, 0, 1).float() / 255), ref)
    torch.testing.assert_close(pre([image, image.permute(2, 0, 1)]), torch.cat([ref, ref]))
    assert pre(image[..., :1]).shape == (1, 3, 224, 224)  # grey, one channel
    with pytest.raises(ValueError, match="channels"):
        pre(torch.zeros(5, 5, 5, dtype=torch.uint8))


@needs_load
def test_preprocess_pil_image(fetched: Path) -> None:
    pil = pytest.importorskip("PIL.Image", reason="Pillow is not installed")
    import torch

    pre = load.Preprocess.from_dir(fetched)
    image = torch.randint(0, 256, (40, 30, 3), dtype=torch.uint8)
    torch.testing.assert_close(pre(pil.fromarray(image.numpy())), pre(image))


@needs_load
def test_transformers_without_dinov3_is_named(fetched: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def boom(*args: Any, **kwargs: Any) -> None:
        raise KeyError("dinov3_vit")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", boom)
    with pytest.raises(LoadError, match="does not know DINOv3") as info:
        load.check_load(fetched)
    assert "transformers>=4.56" in info.value.hint


@needs_load
def test_broken_weights_are_a_load_error(fetched: Path) -> None:
    cfg = json.loads((fetched / "config.json").read_text())
    cfg["hidden_size"] = 64  # the weights are 32 wide: transformers refuses to load them
    (fetched / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="could not load"):
        load.check_load(fetched)


@needs_load
def test_cuda_without_a_gpu_is_a_load_error(fetched: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LoadError, match="sees no CUDA GPU"):
        load.check_load(fetched, device="cuda")
