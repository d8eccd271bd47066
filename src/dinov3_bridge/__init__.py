"""dinov3_bridge: the DINOv3 teacher as a distillation trainer uses it (``torch.nn.Module``, frozen, split outputs).

    from dinov3_bridge.model import DinoV3Teacher
    from dinov3_bridge.config import DinoV3Config

    cfg = DinoV3Config(root=config.train["dino_root"])
    teacher = DinoV3Teacher(cfg, device)

``dinov3_bridge.config`` needs only the standard library; ``dinov3_bridge.model`` needs the ``[load]`` extra
(torch and transformers >= 4.56): ``pip install 'dinov3-fetcher[load]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import DinoV3Config

__all__ = ["DinoV3Config", "DinoV3Features", "DinoV3Output", "DinoV3Teacher", "TeacherMemoryError"]

if TYPE_CHECKING:
    from .model import DinoV3Features, DinoV3Output, DinoV3Teacher, TeacherMemoryError


def __getattr__(name: str) -> Any:
    # Lazy: `import dinov3_bridge` (and its config) must not import torch.
    if name in ("DinoV3Features", "DinoV3Output", "DinoV3Teacher", "TeacherMemoryError"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'dinov3_bridge' has no attribute {name!r}")
