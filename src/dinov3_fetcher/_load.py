"""Load a fetched DINOv3 checkpoint with transformers: ``verify --load`` and the trainer's ``load_teacher``.

Needs the ``[load]`` extra (torch and transformers >= 4.56); both are imported inside the functions, so
``import dinov3_fetcher`` and the CLI stay light on the default install. The image preprocessing is
built here from ``preprocessor_config.json`` with torch alone (transformers' own DINOv3 image processor
needs torchvision): resize to ``size`` (bilinear, antialiased), rescale by ``rescale_factor``, normalize
with ``image_mean`` / ``image_std``.

    from dinov3_fetcher import load_teacher
    teacher, preprocess = load_teacher("dinov3", "cuda")     # fetches if needed, eval mode, no grads
    with torch.no_grad():
        feats = teacher(pixel_values=preprocess(images)).last_hidden_state
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ._config import DEFAULT_REVISION
from ._errors import LoadError, VerificationError
from ._layout import INDEX, PREPROCESSOR, SINGLE, read_json_object, weight_files
from ._registry import DEFAULT_MODEL, variant_for
from ._safetensors import read_header

__all__ = ["MIN_TRANSFORMERS", "Preprocess", "check_load", "load_teacher", "require_load_extra", "weights_size"]

MIN_TRANSFORMERS = (4, 56)
INSTALL_HINT = ("install torch first, the CPU wheel unless you have a GPU: pip install torch --index-url "
                "https://download.pytorch.org/whl/cpu, then pip install 'dinov3-fetcher[load]' (in this repository: "
                "bash .ci/install-load-extra.sh)")
SYNTHETIC_SIZE = (240, 320)  # height, width of the test image check_load feeds (resized to the processor's size)
_DEFAULTS: dict[str, Any] = {
    "do_resize": True, "size": {"height": 224, "width": 224}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
}


def _version_tuple(version: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _import_torch() -> ModuleType:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise LoadError(f"torch is not installed ({exc}); loading the model needs torch", INSTALL_HINT) from None
    except OSError as exc:  # a broken wheel: missing shared library
        raise LoadError(f"torch is installed but does not import: {exc}", "reinstall torch") from None


def _import_transformers() -> ModuleType:
    from ._sources.hf import import_hub

    try:
        import_hub()  # transformers imports huggingface_hub: through the Hub source's rule for its import
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise LoadError(f"transformers is not installed ({exc}); loading DINOv3 needs transformers >= 4.56",
                        INSTALL_HINT) from None
    version = str(getattr(transformers, "__version__", "0"))
    if _version_tuple(version) < MIN_TRANSFORMERS:
        raise LoadError(f"transformers {version} is too old for DINOv3 (needs >= 4.56; older versions fail with "
                        "KeyError: 'dinov3_vit')", "upgrade it: pip install -U 'transformers>=4.56'")
    return transformers


def require_load_extra() -> tuple[ModuleType, ModuleType]:
    """(torch, transformers), imported; LoadError with the install hint when either is missing or too old."""
    return _import_torch(), _import_transformers()


def _device(torch: ModuleType, device: Any) -> Any:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise LoadError(f"unknown device {device!r}: {exc}", "use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU",
                        "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LoadError(f"device {device!r} asked for, but MPS is not available", "use --device cpu")
    return dev


class Preprocess:
    """Images -> the normalized ``pixel_values`` batch the teacher expects, from ``preprocessor_config.json``.

    Accepts a uint8 image as an HxWxC or CxHxW tensor or array, a PIL image, a batch (NxHxWxC / NxCxHxW) or
    a list of any of these (each resized on its own, then stacked). C is 3 (RGB) or 1 (grey, repeated).
    Integer images are rescaled by ``rescale_factor`` (1/255); floating-point images are taken as already
    rescaled to [0, 1] (what torchvision's ``ToTensor`` gives). Returns an (N, 3, H, W) tensor of ``dtype``
    on ``device``; the work happens on that device. Resizing is bilinear with antialiasing (as PIL and
    torchvision do), not followed by rounding to uint8, so values can differ from transformers' processor by
    well under one grey level. An array may be any view, a flipped one too (OpenCV's ``bgr[..., ::-1]``); an
    empty batch (or list) raises ValueError.
    """

    def __init__(self, config: dict[str, Any] | None = None, device: Any = "cpu", dtype: Any = None) -> None:
        cfg = {**_DEFAULTS, **(config or {})}
        self._torch = _import_torch()
        self.device = self._torch.device(device)
        self.dtype = dtype if dtype is not None else self._torch.float32
        self.do_resize = bool(cfg["do_resize"])
        self.size = cfg["size"]
        self.do_rescale = bool(cfg["do_rescale"])
        self.rescale_factor = float(cfg["rescale_factor"])
        self.do_normalize = bool(cfg["do_normalize"])
        self.image_mean = [float(x) for x in cfg["image_mean"]]
        self.image_std = [float(x) for x in cfg["image_std"]]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or not all(self.image_std):
            raise LoadError(f"{PREPROCESSOR}: image_mean/image_std must be 3 numbers, std non-zero",
                            "the checkpoint's preprocessor_config.json is unusual; re-fetch it")
        self._mean = self._torch.tensor(self.image_mean, device=self.device).view(1, 3, 1, 1)
        self._std = self._torch.tensor(self.image_std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_dir(cls, dino_root: str | os.PathLike[str], device: Any = "cpu", dtype: Any = None) -> Preprocess:
        """The preprocessing of the checkpoint in ``dino_root`` (its preprocessor_config.json)."""
        path = Path(dino_root) / PREPROCESSOR
        try:
            cfg = read_json_object(path)
        except (OSError, ValueError) as exc:
            raise LoadError(f"cannot read {path}: {exc}", "run the fetch again to repair dino_root") from None
        return cls(cfg, device, dtype)

    def __repr__(self) -> str:
        return (f"Preprocess(size={self.size}, rescale_factor={self.rescale_factor:.6g}, mean={self.image_mean}, "
                f"std={self.image_std}, device={self.device}, dtype={self.dtype})")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        size = self.size
        if not self.do_resize:
            return height, width
        if isinstance(size, int):
            return size, size
        if isinstance(size, dict) and "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        if isinstance(size, dict) and "shortest_edge" in size:
            short = int(size["shortest_edge"])
            if height <= width:
                return short, max(1, round(width * short / height))
            return max(1, round(height * short / width)), short
        raise LoadError(f"{PREPROCESSOR}: unsupported size {size!r}",
                        "expected {'height': H, 'width': W}, {'shortest_edge': S} or an integer")

    def _to_tensor(self, image: Any) -> Any:
        torch = self._torch
        if isinstance(image, torch.Tensor):
            return image
        if hasattr(image, "convert") and hasattr(image, "tobytes") and hasattr(image, "size"):  # PIL image
            rgb = image.convert("RGB")
            w, h = rgb.size
            return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
        if hasattr(image, "__array__"):
            array = image.__array__()
            if any(step < 0 for step in getattr(array, "strides", ())):  # a flipped view (OpenCV's BGR -> RGB)
                array = array.copy()
            return torch.as_tensor(array)
        raise TypeError(f"cannot preprocess a {type(image).__name__}: pass a tensor, an array or a PIL image")

    def _nchw(self, x: Any) -> Any:
        if x.dim() == 2:
            x = x[None]
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4:
            raise ValueError(f"expected an image (HxWxC or CxHxW) or a batch of them, got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("no images to preprocess (a batch of 0)")
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"expected 1 or 3 channels, got shape {tuple(x.shape)}")
        return x

    def _one(self, image: Any) -> Any:
        torch = self._torch
        x = self._to_tensor(image)
        is_int = not (x.is_floating_point() or x.is_complex())
        x = self._nchw(x).to(self.device).float()
        if self.do_rescale and is_int:
            x = x * self.rescale_factor
        h, w = self.output_size(int(x.shape[2]), int(x.shape[3]))
        if (h, w) != (x.shape[2], x.shape[3]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                                                antialias=True)
        if self.do_normalize:
            x = (x - self._mean) / self._std
        return x.to(self.dtype).contiguous()

    def __call__(self, images: Any) -> Any:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images to preprocess")
            return self._torch.cat([self._one(i) for i in images])
        return self._one(images)


def synthetic_image(height: int = SYNTHETIC_SIZE[0], width: int = SYNTHETIC_SIZE[1]) -> Any:
    """A deterministic uint8 HxWx3 test image (gradients plus seeded noise)."""
    torch = _import_torch()
    y = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    x = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    noise = torch.randint(0, 64, (height, width), generator=torch.Generator().manual_seed(0)).float()
    return torch.stack([y, x, (x + y) / 2 + noise], dim=-1).clamp(0, 255).to(torch.uint8)


@contextlib.contextmanager
def _quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """No "Loading weights" progress bar while we load (restored afterwards)."""
    logging = getattr(getattr(transformers, "utils", None), "logging", None)
    try:
        was = bool(logging.is_progress_bar_enabled()) if logging is not None else False
        if was and logging is not None:
            logging.disable_progress_bar()
    except AttributeError:
        was = False
    try:
        yield
    finally:
        if was and logging is not None:
            logging.enable_progress_bar()


def _load_model(root: Path, dev: Any, dtype: Any = None) -> Any:
    _, transformers = require_load_extra()
    try:
        with _quiet_transformers(transformers):
            model = transformers.AutoModel.from_pretrained(str(root), local_files_only=True)
    except KeyError as exc:
        if "dinov3" in str(exc):
            raise LoadError(f"transformers {transformers.__version__} does not know DINOv3 (KeyError: {exc})",
                            "upgrade it: pip install -U 'transformers>=4.56'") from None
        raise LoadError(f"transformers could not load {root}: KeyError: {exc}",
                        "run 'dinov3-fetcher verify --deep' on dino_root, or re-fetch it") from exc
    except Exception as exc:
        raise LoadError(f"transformers could not load {root}: {type(exc).__name__}: {exc}",
                        "run 'dinov3-fetcher verify --deep' on dino_root, or re-fetch it") from exc
    try:
        if dtype is not None:
            model = model.to(dtype=dtype)
        model = model.to(dev)
    except Exception as exc:
        raise LoadError(f"could not move the model to {dev}: {type(exc).__name__}: {exc}",
                        "use another device or dtype") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def _sync(torch: ModuleType, dev: Any) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def check_load(dino_root: str | os.PathLike[str], device: str = "cpu") -> dict[str, Any]:
    """Load dino_root with transformers (local files only) and run one forward pass on a synthetic image.

    Returns model_class, model_type, parameters, input_shape, output_shape (``last_hidden_state``: for a ViT at
    224x224, [1, 1 + 4 + 196, hidden]), output_finite, device, dtype, the seconds taken to import torch and
    transformers, to load, and for the forward pass, and the torch/transformers versions.

    Raises:
        LoadError: torch or transformers missing or too old, an unusable device, or the model did not load/run.
    """
    root = Path(dino_root)
    t0 = time.perf_counter()
    torch, transformers = require_load_extra()
    dev = _device(torch, device)
    t1 = time.perf_counter()
    model = _load_model(root, dev)
    preprocess = Preprocess.from_dir(root, dev)
    _sync(torch, dev)
    t2 = time.perf_counter()
    pixels = preprocess(synthetic_image())
    try:
        with torch.inference_mode():
            out = model(pixel_values=pixels)
        _sync(torch, dev)
    except Exception as exc:
        raise LoadError(f"the forward pass failed: {type(exc).__name__}: {exc}",
                        "run 'dinov3-fetcher verify --deep' on dino_root, or re-fetch it") from exc
    t3 = time.perf_counter()
    hidden = out.last_hidden_state
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", None),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "input_shape": list(pixels.shape),
        "output_shape": list(hidden.shape),
        "output_finite": bool(torch.isfinite(hidden).all()),
        "device": str(dev),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "import_seconds": round(t1 - t0, 3),
        "load_seconds": round(t2 - t1, 3),
        "forward_seconds": round(t3 - t2, 3),
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
    }


def _resolve_for_loading(root: Path, model_name: str | None, revision: str | None, fetch: bool,
                         shared_fs: bool, share: str | None = None, source: str | None = None,
                         early: BaseException | None = None) -> Path:
    """The checkpoint to load, fetched if asked (inside a job, a collective of every rank: ``early``, what this
    rank raised before, is raised on every rank at its first exchange, so that none waits for this one)."""
    from ._state import StateDir
    from ._validate import why_not

    manifest = StateDir(root).read_manifest() if root.is_dir() else None
    if fetch:
        from ._distributed import any_rank, fetch_once
        from ._registry import DEFAULT_MODEL

        # No model asked for and a complete checkpoint there: load it as it is. Decided together by all ranks
        # of a torch.distributed job (a collective), so that none skips the fetch_once the others enter.
        as_is = model_name is None and why_not(root, None, "") is None
        if not any_rank(not as_is, error=early):
            return root
        if model_name is None and manifest is not None:
            model_name, revision, source = manifest.repo_id, manifest.revision, source or manifest.source
        return fetch_once(root, model_name or DEFAULT_MODEL, revision=revision, shared_fs=shared_fs,
                          share=share, source=source)
    if early is not None:
        raise early
    if (why := why_not(root, model_name, revision or DEFAULT_REVISION, manifest)) is not None:
        hint = ("pass fetch=True to fetch the requested model, or model_name=None to load it" if model_name and
                manifest is not None and manifest.complete else
                "fetch it first (load_teacher(..., fetch=True) or dinov3-fetcher --dino-root DIR)")
        raise VerificationError(f"{root} is not a complete DINOv3 checkpoint" +
                                (f" of {model_name}@{revision or DEFAULT_REVISION}" if model_name else "") +
                                f": {why}", hint)
    return root


def load_teacher(
    dino_root: str | os.PathLike[str],
    device: Any = "cpu",
    *,
    model_name: str | None = None,
    revision: str | None = None,
    fetch: bool = True,
    dtype: Any = None,
    shared_fs: bool = False,
    share: str | None = None,
    source: str | None = None,
) -> tuple[Any, Preprocess]:
    """The teacher for distillation: ``(model, preprocess)``, the model in eval mode with gradients off.

    - ``model_name=None``: use what dino_root holds if it is a complete checkpoint; otherwise fetch the model
      its manifest names, or the default (ViT-L/16). With a name: fetch that model at ``revision`` unless
      dino_root already holds it (no network request then).
    - ``fetch=False``: never touch the network; raise VerificationError if dino_root is not complete (or holds
      another model than ``model_name``).
    - Inside torch.distributed (torchrun) the fetch runs once per node (``shared_fs=True``: once per job), the
      other ranks wait for it (see ``dinov3_fetcher.fetch_once``). ``share="broadcast"``: global rank 0 fetches
      once per job and the other nodes receive the bytes from it over torch.distributed (nodes with their own
      disks).
    - ``dtype`` (e.g. ``torch.bfloat16``) casts the model, and ``preprocess`` then returns that dtype.
    - ``preprocess(images)`` turns uint8 HxWx3 / CxHxW tensors, arrays, PIL images or batches into the
      normalized (N, 3, H, W) ``pixel_values`` on ``device`` (see ``Preprocess``).

    Raises:
        LoadError: torch/transformers missing or too old, an unusable device, or the model did not load.
        VerificationError: fetch=False and dino_root is not (the requested) complete checkpoint.
        and, when it fetches, the errors of ``fetch_dinov3``.
    """
    early: LoadError | None = None
    try:  # before any download: say what is missing first (on every rank of a job: see _resolve_for_loading)
        torch, _ = require_load_extra()
        dev = _device(torch, device)
    except LoadError as exc:
        early = exc
    root = Path(os.path.abspath(Path(dino_root).expanduser()))
    root = _resolve_for_loading(root, model_name, revision, fetch, shared_fs, share, source, early)
    model = _load_model(root, dev, dtype)
    return model, Preprocess.from_dir(root, dev, dtype)


def weights_size(dino_root: str | os.PathLike[str], model_name: str | None = None) -> tuple[int, int] | None:
    """The teacher's weights as (parameters, bytes as stored), to size a device before loading: from the
    safetensors headers in ``dino_root`` when its weights are there and whole, else from the parameter count of
    the official checkpoint ``model_name`` names (the default model when None) in float32; None when neither is
    known. Reads headers only, and never raises for a missing or damaged folder.
    """
    root = Path(dino_root)
    try:
        names = {n for n in (SINGLE, INDEX) if (root / n).is_file()}
        weights = weight_files(names, lambda: read_json_object(root / INDEX))
        if weights:
            tensors = [t for name in weights for t in read_header(root / name).values()]
            return sum(math.prod(t.shape) for t in tensors), sum(t.end - t.begin for t in tensors)
    except (OSError, ValueError):
        pass  # incomplete or damaged: the fetch (or the load) says what is wrong
    variant = variant_for(model_name or DEFAULT_MODEL)
    if variant is None:
        return None
    parameters = int(variant.params_m * 1e6)
    return parameters, 4 * parameters
