#!/usr/bin/env bash
# Install the [load] extra (torch + transformers) into the project venv (.venv) WITHOUT letting uv pick torch.
#
# Why not `uv sync --extra load`: uv.lock resolves the extra to torch 2.15 with its CUDA wheels (~3 GB of
# downloads). This machine keeps a CPU build of torch 2.13.0 on disk that only pip finds (pip's config:
# find-links /opt/wheels), so:
#   1. `uv sync --frozen` (only if .venv is missing): the default install plus the dev group;
#   2. torch: pip (the machine's, told to install into .venv with --python) takes torch==$TORCH_VERSION, the
#      local CPU wheel; skipped when .venv already has a torch >= 2.4 (any build);
#   3. transformers: `uv pip install`, constrained to the versions uv.lock records for the extra (torch and
#      its CUDA packages left out), so CI gets the same transformers/tokenizers/safetensors/numpy as the lock;
#   4. checks: torch and transformers import, transformers knows DINOv3, huggingface_hub is still the locked one.
#
# Idempotent (a second run installs nothing) and loud (set -e; any failed step exits non-zero).
# After it, use `uv run` (inexact sync: it keeps torch and transformers) but NOT `uv sync` (exact: removes them).
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY=.venv/bin/python
say() { echo "install-load-extra: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

command -v uv >/dev/null || die "uv is not on PATH"
if [[ ! -x $PY ]]; then
    say "no .venv yet: uv sync --frozen"
    uv sync --frozen
fi

# --- torch -------------------------------------------------------------------------------------------------
have_torch() {
    "$PY" - <<'EOF' 2>/dev/null
import sys
import torch
major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 4) else 1)
EOF
}
if have_torch; then
    say "torch already in .venv: $("$PY" -c 'import torch; print(torch.__version__)')"
else
    say "installing torch==$TORCH_VERSION with pip (CPU wheel from the machine's wheel store)"
    # pip >= 22.3 installs into another interpreter with --python; the venv uv made has no pip of its own.
    PIP=(python3 -m pip)
    "${PIP[@]}" --version >/dev/null 2>&1 || PIP=(pip)
    "${PIP[@]}" --python "$PY" install --no-input "torch==$TORCH_VERSION" \
        || die "pip could not install torch==$TORCH_VERSION (is the CPU wheel in pip's find-links? try: pip config list)"
    have_torch || die "torch still does not import after pip installed it"
    if ls .venv/lib/python*/site-packages | grep -q -E '^nvidia_|^triton'; then
        die "pip pulled CUDA packages (nvidia-*/triton): it took a CUDA build of torch, not the CPU wheel"
    fi
fi

# --- transformers (versions from uv.lock, without torch and its CUDA dependencies) ----------------------------
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
uv export --frozen --no-hashes --no-emit-project --no-header --no-dev --extra load \
    | grep -v -E '^(torch|triton|nvidia-|cuda-)' | grep -v -E '^\s*#' > "$constraints"
grep -q '^transformers==' "$constraints" || die "uv.lock has no transformers for the [load] extra"
say "installing $(grep '^transformers==' "$constraints") (versions from uv.lock)"
uv pip install --python "$PY" --constraints "$constraints" 'transformers>=4.56'

# --- checks --------------------------------------------------------------------------------------------------
"$PY" - <<'EOF' || die "the [load] extra does not work in .venv"
import huggingface_hub
import torch
import transformers
from transformers import AutoConfig, DINOv3ConvNextModel, DINOv3ViTModel  # noqa: F401  (>= 4.56 has them)

AutoConfig.for_model("dinov3_vit")
print(f"install-load-extra: ok: torch {torch.__version__} (cuda: {torch.version.cuda}), "
      f"transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}")
EOF
