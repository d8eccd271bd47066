# https://github.com/casey/just  (`uv tool install rust-just` or `pip install rust-just`)

# Fetch the DINOv3 teacher into config.json's train.dino_root
fetch-dinov3:
    uv run dinov3-fetcher --config config.json

# The test suite (the same command CI runs); `just test -m slow` for the long ones
test *ARGS:
    uv run pytest {{ARGS}}

# ruff + mypy, as CI runs them
lint:
    uv run ruff check .
    uv run mypy

# Benchmarks against curl, aria2c and `hf download` (see BENCHMARKS.md); `just bench --link far,cdn --plot bench/figures/links.png`
bench *ARGS:
    uv run --group bench python bench/run.py {{ARGS}}
