"""Run the local Hub emulator by hand, for demos and manual checks: ``uv run python tests/serve.py``.

Serves ``tiny-org/dinov3-vit-tiny`` (open), ``tiny-org/dinov3-vit-gated`` (gated; token ``hf_valid_granted`` is
granted) and ``tiny-org/dinov3-convnext-sharded`` (2 shards), prints ``HF_ENDPOINT=...`` and serves until Ctrl-C.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import convnext_repo_files, shard_files, vit_repo_files
from hub_server import HubServer


def main() -> None:
    with HubServer() as hub:
        hub.add_repo("tiny-org/dinov3-vit-tiny", vit_repo_files())
        hub.add_repo("tiny-org/dinov3-vit-gated", vit_repo_files(seed=1), gated=True)
        hub.grant("tiny-org/dinov3-vit-gated", "hf_valid_granted")
        hub.add_repo("tiny-org/dinov3-convnext-sharded", shard_files(convnext_repo_files(), 2))
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
