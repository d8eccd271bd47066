"""Run the local Hub emulator by hand, for demos and manual checks: ``uv run python tests/serve.py``.

Prints, then serves until Ctrl-C (the session in docs/cli.md is recorded against it)::

    export HF_ENDPOINT=http://127.0.0.1:<port>
    # repos: tiny-org/dinov3-vit-tiny (open), tiny-org/dinov3-vit-gated (gated: token hf_valid_granted is
    #        granted, hf_valid_notgranted is not), tiny-org/dinov3-convnext-sharded (open, 2 shards)
    # paste the export line into another shell, then e.g.: uv run dinov3-fetcher --dino-root /tmp/demo/dinov3 ...
    # serving until Ctrl-C
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import convnext_repo_files, shard_files, vit_repo_files
from hub_server import HubServer

OPEN, GATED, SHARDED = "tiny-org/dinov3-vit-tiny", "tiny-org/dinov3-vit-gated", "tiny-org/dinov3-convnext-sharded"
GRANTED, NOTGRANTED = "hf_valid_granted", "hf_valid_notgranted"


def add_demo_repos(hub: HubServer) -> None:
    """The three repos this script serves (the recorded session in docs/cli.md is replayed against them)."""
    hub.add_repo(OPEN, vit_repo_files())
    hub.add_repo(GATED, vit_repo_files(seed=1), gated=True)
    hub.grant(GATED, GRANTED)
    hub.add_repo(SHARDED, shard_files(convnext_repo_files(), 2))


def main() -> None:
    with HubServer() as hub:
        add_demo_repos(hub)
        print(f"export HF_ENDPOINT={hub.endpoint}\n"
              f"# repos: {OPEN} (open), {GATED} (gated: token {GRANTED} is granted, {NOTGRANTED} is not),\n"
              f"#        {SHARDED} (open, 2 shards)\n"
              f"# paste the export line into another shell, then e.g.: uv run dinov3-fetcher --dino-root "
              f"/tmp/demo/dinov3 --model {OPEN}\n"
              "# serving until Ctrl-C", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
