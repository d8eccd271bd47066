"""``DinoV3Teacher``: a frozen DINOv3 teacher module for distillation, its outputs split into CLS/registers/patches.

    teacher = DinoV3Teacher(DinoV3Config(root="dinov3"), "cuda")
    out = teacher(teacher.preprocess(images))        # images: uint8 HxWx3, batches, PIL, arrays...
    out.cls_token        # (B, D)
    out.register_tokens  # (B, R, D)
    out.patch_tokens     # (B, N, D), N = (H / 16) * (W / 16), row-major
    out.patch_grid       # (B, D, H / 16, W / 16)

The tokens are transformers' ``last_hidden_state`` (after the final LayerNorm) split as it is laid out:
1 CLS token, then R register tokens, then the patches row by row. ``forward(pixel_values, layers=[...])`` also
returns intermediate blocks split the same way.

ConvNeXt checkpoints work too, as a feature map: ``cls_token`` is the pooled token transformers puts first,
``register_tokens`` is empty (R = 0), ``patch_tokens``/``patch_grid`` are the last stage's map at stride 32
(``patch_size`` is 32); intermediate ``layers`` are refused (the stages have different widths).

Memory: the weights take ``parameters x bytes per element`` (float32 4, bfloat16/float16 2) on the device.
A ViT-L/16 needs 1.2 GB in float32 (0.6 GB in bf16); the ViT-7B/16 needs 26.9 GB in float32 and 13.4 GB in
bf16 on the GPU, so use ``dtype="bfloat16"`` on a 24 GB+ GPU. Activations come on top: under ``no_grad``
nothing is kept between blocks, so at batch 64 and 224x224 in bf16 a block's peak is about 0.6 GB (hidden
64x201x4096 = 105 MB, SwiGLU 2x64x201x8192 = 420 MB); asking for ``layers`` keeps every block's hidden state
until the call returns (40 x 105 MB = 4.2 GB for the 7B at that batch). Loading goes through the CPU: the host needs the
checkpoint's size in RAM (26.9 GB for the 7B) while it loads. On CUDA the teacher refuses before loading when
the weights (plus 10% headroom) exceed ``torch.cuda.mem_get_info``'s free memory, with both figures and the
fix. Sharding a 7B teacher over several GPUs is not done here: load it yourself with
``transformers.AutoModel.from_pretrained(root, device_map="auto", dtype=torch.bfloat16)`` (needs accelerate).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

try:
    import torch
except ImportError as _exc:  # pragma: no cover - depends on the install
    raise ImportError(
        f"dinov3_bridge.model needs torch ({_exc}): install the [load] extra: pip install 'dinov3-fetcher[load]'"
    ) from None

from dinov3_fetcher import load_teacher, weights_size

from .config import DinoV3Config

__all__ = [
    "HEADROOM",
    "DinoV3Features",
    "DinoV3Output",
    "DinoV3Teacher",
    "TeacherMemoryError",
    "check_device_memory",
    "estimate_weight_bytes",
]

HEADROOM = 1.10  # weights x 1.10 must fit in free GPU memory: CUDA context, allocator slack, small batches
CONVNEXT_STRIDE = 32  # 4 (stem) x 2 x 2 x 2 (downsampling between the 4 stages)


class TeacherMemoryError(RuntimeError):
    """The device has too little free memory for the teacher's weights (``needed`` and ``free``, in bytes)."""

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.free = free


@dataclass
class DinoV3Features:
    """One layer's tokens, split. ``patch_grid`` is ``patch_tokens`` as a (B, D, H/p, W/p) map (a view)."""

    cls_token: torch.Tensor  # (B, D)
    register_tokens: torch.Tensor  # (B, R, D)
    patch_tokens: torch.Tensor  # (B, N, D), N = (H/p) * (W/p), row-major
    patch_grid: torch.Tensor  # (B, D, H/p, W/p)


@dataclass
class DinoV3Output(DinoV3Features):
    """The last layer (after the final LayerNorm, = transformers' ``last_hidden_state``) and the requested
    intermediate ``layers``, keyed by the index as asked (``-1`` stays ``-1``), in the order asked."""

    last_hidden_state: torch.Tensor | None = None  # (B, 1 + R + N, D) as transformers returns it
    layers: dict[int, DinoV3Features] = field(default_factory=dict)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _dtype_size(dtype_name: str | None, default: int) -> int:
    if dtype_name is None:
        return default
    return int(torch.empty((), dtype=getattr(torch, dtype_name)).element_size())


def estimate_weight_bytes(root: str | os.PathLike[str], model_name: str | None = None,
                          dtype_name: str | None = None) -> int | None:
    """Bytes the weights take on the device in ``dtype_name`` (None: as stored).

    From the safetensors headers in ``root`` (``model.safetensors``, or the shards its index names) when they
    are there; otherwise from the parameter count of the official checkpoint ``model_name`` names (the
    default ViT-L/16 when None) in float32; None when neither is known (``dinov3_fetcher.weights_size``).
    """
    size = weights_size(root, model_name)
    if size is None:
        return None
    parameters, stored = size
    return stored if dtype_name is None else parameters * _dtype_size(dtype_name, 4)


def check_device_memory(needed: int, free: int, *, device: str = "cuda", dtype_name: str | None = None,
                        total: int | None = None) -> None:
    """Raise TeacherMemoryError when ``needed`` bytes of weights (x HEADROOM) exceed ``free`` device memory.

    ``free`` (and ``total``) are what ``torch.cuda.mem_get_info(device)`` reports; the teacher calls this
    before loading anything onto a CUDA device.
    """
    if needed * HEADROOM <= free:
        return
    in_dtype = dtype_name or "the checkpoint's dtype (float32)"
    fixes = []
    if dtype_name not in ("bfloat16", "float16"):
        fixes.append(f"dtype='bfloat16' (halves it: {_gib(needed / 2)})"
                     if dtype_name in (None, "float32") else "dtype='bfloat16'")
    fixes += ["free the GPU (other processes, earlier models)", "a GPU with more memory",
              "or shard it over several GPUs: transformers.AutoModel.from_pretrained(root, device_map='auto', "
              "dtype=torch.bfloat16)"]
    of_total = f" of {_gib(total)}" if total is not None else ""
    raise TeacherMemoryError(
        f"the DINOv3 teacher does not fit on {device}: its weights need {_gib(needed)} in {in_dtype} "
        f"(+{round((HEADROOM - 1) * 100)}% headroom: {_gib(needed * HEADROOM)}), but only {_gib(free)}"
        f"{of_total} is free. Fix: " + "; ".join(fixes),
        needed=needed, free=free)


def _resolve_dtype(cfg: DinoV3Config) -> torch.dtype | None:
    if cfg.dtype is None or isinstance(cfg.dtype, torch.dtype):
        return cfg.dtype
    name = cfg.dtype_name
    dtype = getattr(torch, name or "", None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"DinoV3Config.dtype {cfg.dtype!r} is not a torch dtype")
    return dtype


PIXEL_MARGIN = 2.0  # how far beyond the normalized range a value must lie to be refused (a factor)
PIXEL_FLOOR = 10.0  # refused beyond this at least: ImageNet's mean/std give |x| <= 2.64, SAT-493M's <= 4.92


def pixel_reach(mean: Sequence[float], std: Sequence[float]) -> float:
    """The farthest from 0 a [0, 1] image gets once normalized with ``mean``/``std`` (ImageNet's: 2.64)."""
    return max(max(abs(-m / s), abs((1 - m) / s)) for m, s in zip(mean, std, strict=True))


def pixel_limit(mean: Sequence[float], std: Sequence[float]) -> float:
    """The largest |value| ``forward`` takes: ``PIXEL_MARGIN`` times ``pixel_reach``, and at least ``PIXEL_FLOOR``
    (10: ImageNet's normalization reaches 2.64, SAT-493M's 4.92). Raw 0..255 floats, normalized or not, lie far
    beyond it."""
    return max(PIXEL_FLOOR, PIXEL_MARGIN * pixel_reach(mean, std))


class DinoV3Teacher(torch.nn.Module):  # type: ignore[misc,unused-ignore]
    """The DINOv3 teacher: frozen, always in eval mode, on ``device``, in ``cfg.dtype``.

    Building it fetches the checkpoint if needed (``cfg.fetch``; once per node in a torch.distributed job),
    loads it with transformers (``self.model``), casts it and moves it to ``device``. ``.train()`` from a
    parent module leaves it in eval mode (DINOv3 jitters its RoPE coordinates in train mode) and
    ``requires_grad_(True)`` on it leaves it frozen. A parent's ``requires_grad_(True)`` flips the flag on the
    teacher's parameters directly (torch walks ``parameters()``), but ``forward`` runs under
    ``torch.no_grad()``, so no gradient ever reaches them, and the next ``.train()``/``.eval()`` re-freezes.

    Attributes: ``embed_dim`` (D), ``patch_size`` (16; 32 for ConvNeXt), ``num_register_tokens`` (R; 0 for
    ConvNeXt), ``num_layers``, ``is_convnext``, ``root`` (the resolved dino_root), ``device``, ``dtype``,
    ``image_size`` ((H, W) ``preprocess`` resizes to).
    """

    def __init__(self, cfg: DinoV3Config, device: Any = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        dtype = _resolve_dtype(cfg)
        dev = torch.device(device)
        root = cfg.resolved_root
        if dev.type == "cuda" and cfg.check_memory and torch.cuda.is_available():
            needed = estimate_weight_bytes(root, cfg.model_name, str(dtype).removeprefix("torch.") if dtype else None)
            if needed is not None:
                free, total = torch.cuda.mem_get_info(dev)
                check_device_memory(needed, int(free), device=str(dev), total=int(total),
                                    dtype_name=str(dtype).removeprefix("torch.") if dtype else None)
        model, preprocess = load_teacher(root, dev, model_name=cfg.model_name, revision=cfg.revision,
                                         fetch=cfg.fetch, dtype=dtype, shared_fs=cfg.shared_fs,
                                         share=cfg.share, source=cfg.source)
        self.model = model
        self._preprocess = preprocess
        self.root = root
        mc = model.config
        self.is_convnext = getattr(mc, "model_type", "") == "dinov3_convnext"
        if self.is_convnext:
            self.embed_dim = int(mc.hidden_sizes[-1])
            self.patch_size = CONVNEXT_STRIDE
            self.num_register_tokens = 0
            self.num_layers = len(mc.depths)
        else:
            ps = mc.patch_size
            self.patch_size = int(ps if isinstance(ps, int) else ps[0])
            self.embed_dim = int(mc.hidden_size)
            self.num_register_tokens = int(getattr(mc, "num_register_tokens", 0))
            self.num_layers = int(mc.num_hidden_layers)
        self.image_size = preprocess.output_size(self.patch_size * 14, self.patch_size * 14)
        self._pixel_reach = pixel_reach(preprocess.image_mean, preprocess.image_std)
        self._pixel_limit = pixel_limit(preprocess.image_mean, preprocess.image_std)
        self._range_seen: set[torch.device] = set()  # accelerators whose first batch passed the range check
        self.requires_grad_(False)
        super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the weights are (follows a parent's ``.to()``)."""
        return next(self.model.parameters()).device  # type: ignore[no-any-return,unused-ignore]

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (``cfg.dtype`` if given)."""
        return next(self.model.parameters()).dtype  # type: ignore[no-any-return,unused-ignore]

    # --- frozen, eval ---------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> DinoV3Teacher:
        """Stays in eval mode whatever ``mode`` is (a teacher never trains), and re-freezes the parameters
        (a parent's ``requires_grad_(True)`` sets the flag on them directly, not through this module)."""
        super().train(False)
        self.requires_grad_(False)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> DinoV3Teacher:
        """Stays frozen: every parameter keeps ``requires_grad=False``."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    # --- inputs ----------------------------------------------------------------------------------------------

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images -> normalized ``pixel_values`` (N, 3, H, W) on the teacher's device, in its dtype.

        uint8 or float (already in [0, 1]) images as HxWxC / CxHxW tensors or arrays, PIL images, batches or
        lists; resized (bilinear, antialiased) to ``preprocessor_config.json``'s size (224x224 for the
        official checkpoints), rescaled by 1/255, normalized with its mean/std (see
        ``dinov3_fetcher.load_teacher``).
        """
        out: torch.Tensor = self._preprocess(images)
        return out.to(device=self.device, dtype=self.dtype)

    def _check_pixels(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}: "
                             "use teacher.preprocess(images)")
        if not pixel_values.is_floating_point():  # raw images (0..255): the features would be of wrong values
            raise ValueError(f"pixel_values are {str(pixel_values.dtype).removeprefix('torch.')}, not normalized "
                             "floats: call teacher.preprocess(images) first (it rescales and normalizes them)")
        if pixel_values.shape[0] == 0:
            raise ValueError("pixel_values hold no image (a batch of 0): skip the call for an empty batch")
        self._check_range(pixel_values)
        h, w = int(pixel_values.shape[2]), int(pixel_values.shape[3])
        p = self.patch_size
        if h % p or w % p or h == 0 or w == 0:
            down = f"{max(p, h // p * p)}x{max(p, w // p * p)}"
            up = f"{-(-h // p) * p}x{-(-w // p) * p}"
            raise ValueError(f"pixel_values of {h}x{w} (HxW): both sides must be multiples of the patch size {p}"
                             f"{' (ConvNeXt stride)' if self.is_convnext else ''}; resize or crop to {down} "
                             f"or pad to {up}")
        return h // p, w // p

    def _check_range(self, pixel_values: torch.Tensor) -> None:
        """ValueError for float pixels no normalization gives (0..255 floats, say: ``preprocess`` forgotten). Every
        batch on the CPU (one read of the batch, no copy); on an accelerator, the first batch
        of each device only, so that later calls never wait for the device (reading the peak is a
        synchronisation)."""
        device = pixel_values.device
        if device.type != "cpu" and device in self._range_seen:
            return
        low, high = torch.aminmax(pixel_values.detach())
        peak = float(torch.maximum(-low, high))  # (NaN compares False: the forward gives NaN back)
        if peak > self._pixel_limit:
            raise ValueError(f"pixel_values reach {peak:.4g}: not normalized images (they stay within "
                             f"+/-{self._pixel_reach:.2f} under this teacher's mean/std; beyond {self._pixel_limit:g} "
                             "is refused): call teacher.preprocess(images) first (it rescales 0..255 or 0..1 images "
                             "and normalizes them)")
        if device.type != "cpu":
            self._range_seen.add(device)

    # --- forward ---------------------------------------------------------------------------------------------

    def _split(self, tokens: torch.Tensor, gh: int, gw: int) -> DinoV3Features:
        r = self.num_register_tokens
        patches = tokens[:, 1 + r:, :]
        b, _, d = patches.shape
        return DinoV3Features(
            cls_token=tokens[:, 0, :],
            register_tokens=tokens[:, 1:1 + r, :],
            patch_tokens=patches,
            patch_grid=patches.transpose(1, 2).reshape(b, d, gh, gw),
        )

    def _layer_indices(self, layers: Sequence[int]) -> list[tuple[int, int]]:
        if self.is_convnext and layers:
            raise ValueError("intermediate layers are for ViT teachers: a ConvNeXt's stages have different widths "
                             "and strides; use the output feature map (patch_grid) or a ViT checkpoint")
        out = []
        n = self.num_layers
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ValueError(f"layer {i!r} does not exist: this teacher has {n} blocks (0..{n - 1}, or "
                                 f"-{n}..-1 from the end)")
            out.append((i, i % n))
        return out

    def forward(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> DinoV3Output:
        """Teacher features for ``pixel_values`` (B, 3, H, W), H and W multiples of ``patch_size``.

        ``layers``: block indices (0-based, negative from the end; default ``cfg.layers``) whose outputs are
        returned in ``.layers`` split like the last layer; with ``cfg.layer_norm`` (default) they go through
        the final LayerNorm, so ``layers=[-1]`` equals the last layer. No gradients, no host synchronisation
        (after the first batch on an accelerator).

        Raises ValueError, naming the fix: a shape other than (B, 3, H, W), H or W not a multiple of the patch
        size, integer pixels (uint8 images not yet through ``teacher.preprocess``), float pixels beyond
        ``pixel_limit`` (0..255 floats, not normalized: checked on every CPU batch, and on the first batch of
        each accelerator only, the one host synchronisation), or an empty batch (B = 0: there is nothing to
        compute; skip the call).
        """
        gh, gw = self._check_pixels(pixel_values)
        wanted = self._layer_indices(layers if layers is not None else (self.cfg.layers or ()))
        with torch.no_grad():
            return self._forward(pixel_values, wanted, gh, gw)

    def _forward(self, pixel_values: torch.Tensor, wanted: list[tuple[int, int]], gh: int, gw: int) -> DinoV3Output:
        x = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        out = self.model(pixel_values=x, output_hidden_states=bool(wanted))
        last = out.last_hidden_state
        feats = self._split(last, gh, gw)
        result = DinoV3Output(cls_token=feats.cls_token, register_tokens=feats.register_tokens,
                              patch_tokens=feats.patch_tokens, patch_grid=feats.patch_grid, last_hidden_state=last)
        for asked, k in wanted:
            hidden = out.hidden_states[k + 1]  # hidden_states[0] is the embedding output
            if self.cfg.layer_norm:
                hidden = self.model.norm(hidden)
            result.layers[asked] = self._split(hidden, gh, gw)
        return result

    def extra_repr(self) -> str:
        kind = "convnext" if self.is_convnext else "vit"
        return (f"root={str(self.root)!r}, {kind}, embed_dim={self.embed_dim}, patch_size={self.patch_size}, "
                f"num_register_tokens={self.num_register_tokens}, dtype={self.dtype}")
