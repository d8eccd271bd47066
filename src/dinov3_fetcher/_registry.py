"""The official DINOv3 checkpoints on the Hub, as data (source: ../shared/DINOV3.md).

Used by ``list``, by the config-vs-registry check for official ids, and by the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MODEL", "VARIANTS", "Variant", "variant_for"]

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

    @property
    def is_default(self) -> bool:
        """Is this the default model (ViT-L/16)?"""
        return self.repo_id == DEFAULT_MODEL


def _vit(name: str, arch: str, d: int, h: int, n: int, i: int, gated: bool, params: float, size: float,
         sharded: bool = False) -> Variant:
    return Variant(f"facebook/{name}", arch, "vit", params, int(size * 1e9), d, h, n, i, gated, sharded=sharded)


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
    _vit("dinov3-vit7b16-pretrain-lvd1689m", "ViT-7B/16", 4096, 32, 40, 8192, True, 6716.0, 26.9, sharded=True),
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
