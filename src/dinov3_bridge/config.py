"""``DinoV3Config``: where the teacher lives and how to load it (standard library only: no torch import)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DinoV3Config"]

_DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


@dataclass
class DinoV3Config:
    """How ``DinoV3Teacher`` finds, fetches and runs the DINOv3 checkpoint.

    Args:
        root: dino_root, the folder holding (or to hold) the checkpoint. A relative ``root`` is relative to the
            **process's working directory** when the teacher is built (the trainer passes
            ``config.train["dino_root"]`` as written in its config file), unless ``base`` is given. Note that
            ``dinov3-fetcher --config config.json`` resolves a relative ``train.dino_root`` against the config
            file's folder; to load exactly what it fetched when the trainer runs from another folder, pass
            ``base=<the config file's folder>`` or use ``DinoV3Config.from_pipeline_config(path)``, which
            resolves it the same way the fetcher does. ``~`` is expanded.
        model_name: Hub repo id. None: load whatever complete checkpoint ``root`` holds (and, with ``fetch``,
            fetch the model its manifest names, or the default ViT-L/16, if there is none).
        revision: branch, tag or commit of ``model_name`` (default: the source's default branch, ``main``;
            ``master`` on ModelScope).
        source: ``"hf"`` or ``"modelscope"`` (default: what dino_root's manifest says, else
            DINOV3_FETCHER_SOURCE, else ``"hf"``).
        fetch: True: a missing or incomplete checkpoint is fetched (once per node under torch.distributed, once
            per job with ``shared_fs``), a complete one is used without any network request. False: nothing
            touches the network; an incomplete ``root`` raises ``VerificationError``.
        dtype: None (the checkpoint's, float32), a ``torch.dtype`` or a name: ``"bfloat16"``/``"bf16"``,
            ``"float16"``/``"fp16"``, ``"float32"``/``"fp32"``. ``preprocess`` then returns that dtype.
        shared_fs: ``root`` is on a filesystem every node sees: fetch once per job (global rank 0).
        share: ``"broadcast"``: nodes with their own disks; global rank 0 fetches once per job and the other
            nodes receive the bytes from it over torch.distributed (see ``fetch_once``). None: as ``shared_fs``.
        layers: default intermediate layers ``forward`` returns (block indices, negative from the end).
        layer_norm: apply the model's final LayerNorm to intermediate layers (as DINOv3's
            ``get_intermediate_layers(norm=True)`` does); False returns transformers' raw ``hidden_states``.
        base: folder a relative ``root`` is resolved against (default: the working directory).
        check_memory: on a CUDA device, refuse before loading when the weights cannot fit in free memory.
    """

    root: str | os.PathLike[str]
    model_name: str | None = None
    revision: str | None = None
    fetch: bool = True
    dtype: Any = None
    shared_fs: bool = False
    share: str | None = None
    source: str | None = None
    layers: Sequence[int] | None = None
    layer_norm: bool = True
    base: str | os.PathLike[str] | None = None
    check_memory: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, ignored by the teacher

    def __post_init__(self) -> None:
        if not isinstance(self.root, (str, os.PathLike)) or not str(self.root).strip():
            raise ValueError(f"DinoV3Config.root must be a non-empty path, got {self.root!r}: "
                             'set train.dino_root in the config, e.g. "dinov3"')
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"DinoV3Config.layers must be a list of block indices, got {self.layers!r}")
            self.layers = tuple(self.layers)
        if isinstance(self.dtype, str) and self.dtype.lower().removeprefix("torch.") not in _DTYPE_NAMES:
            raise ValueError(f"DinoV3Config.dtype {self.dtype!r} is not one of {sorted(_DTYPE_NAMES)}")

    @property
    def resolved_root(self) -> Path:
        """The absolute dino_root: ``root`` with ``~`` expanded, resolved against ``base`` or the cwd."""
        path = Path(self.root).expanduser()
        if not path.is_absolute():
            path = Path(self.base).expanduser() / path if self.base is not None else Path.cwd() / path
        return Path(os.path.abspath(path))

    @property
    def dtype_name(self) -> str | None:
        """``dtype`` as a torch attribute name (``"bfloat16"``...), or None."""
        if self.dtype is None:
            return None
        text = str(self.dtype).lower().removeprefix("torch.")
        return _DTYPE_NAMES.get(text, text)

    @classmethod
    def from_pipeline_config(cls, path: str | os.PathLike[str], **overrides: Any) -> DinoV3Config:
        """From the pipeline's config.json, read exactly as ``dinov3-fetcher --config`` reads it (the fetcher's
        own resolution, its ConfigError included): ``train.dino_root`` against the file's folder, and
        ``train.dino_model`` / ``dino_revision`` / ``dino_source`` where present."""
        from dinov3_fetcher import read_pipeline_config

        asked = read_pipeline_config(path)
        kwargs: dict[str, Any] = {"root": asked["dino_root"], "source": asked["source"]}
        if asked["model"] is not None:
            kwargs["model_name"] = asked["model"]
        if asked["revision"] is not None:
            kwargs["revision"] = asked["revision"]
        kwargs.update(overrides)
        return cls(**kwargs)
