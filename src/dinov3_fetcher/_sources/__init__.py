"""Where a checkpoint's files come from: one module per hub behind one interface (``source.Source``).

``hf``: the Hugging Face Hub or a mirror of it, through huggingface_hub; ``modelscope``: ModelScope, through our
own HTTP client. A new hub is one more module here and one more line in ``get_source``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _secrets
from .._errors import ConfigError

if TYPE_CHECKING:
    from .source import Source

__all__ = ["SOURCES", "get_source", "known_secrets"]

SOURCES = ("hf", "modelscope")


def get_source(name: str = "hf") -> Source:
    """The source named ``name``, set up from the environment (endpoint, token).

    Raises:
        ConfigError: an unknown name, or the source's endpoint variable is malformed.
    """
    if name == "hf":
        from .hf import HfSource

        return HfSource()
    if name == "modelscope":
        from .modelscope import ModelScopeSource

        return ModelScopeSource.from_env()
    raise ConfigError(f"unknown source {name!r}", f"use one of: {', '.join(SOURCES)}")


def known_secrets() -> list[str]:
    """Every token this process could send to any source (the Hub's and ModelScope's, from the environment and
    the saved logins), for the scrubber (_secrets) to hide; never blocks, never raises."""
    from . import hf, modelscope

    found = hf.known_tokens() + modelscope.known_tokens()
    return [t.strip() for t in found if len(t.strip()) >= 4]


_secrets.register(known_secrets)  # every error and every output line hides them from now on
