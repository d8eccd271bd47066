"""validate and verify against hostile files on disk: nothing they hold makes them raise, a damaged manifest
counts as no manifest, and verify never overwrites a manifest that a fetch published while it was hashing."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from checkpoints import convnext_repo_files, convnext_tensors, safetensors_bytes, shard_files, vit_repo_files
from conftest import TINY
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher._progress import Progress
from dinov3_fetcher._state import StateDir
from dinov3_fetcher._validate import find_problems
from dinov3_fetcher._verify import verify_dinov3
from helpers import error_line
from hub_server import HubServer

DEEP = 200_000


def _nested_header(size: int) -> bytes:
    """A safetensors file of exactly ``size`` bytes whose header is '[' nested as deep as it fits."""
    return struct.pack("<Q", size - 8) + b"[" * (size - 8)


def _write(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("name", ["config.json", "preprocessor_config.json", "model.safetensors"])
def test_deeply_nested_json_is_a_problem_not_a_crash(tmp_path: Path, name: str) -> None:
    files = vit_repo_files()
    files[name] = _nested_header(DEEP + 8) if name.endswith(".safetensors") else b"[" * DEEP
    root = _write(tmp_path / "dinov3", files)
    assert validate_dinov3(root) is False
    problems = find_problems(root)
    assert [p.file for p in problems] == [name]
    assert "nested too deeply" in problems[0].message


def test_deeply_nested_index_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    files = shard_files(vit_repo_files(), 2)
    files["model.safetensors.index.json"] = b'{"weight_map": ' * DEEP
    root = _write(tmp_path / "dinov3", files)
    assert validate_dinov3(root) is False
    assert any("nested too deeply" in p.message for p in find_problems(root))


def test_zero_dimensional_depthwise_conv(tmp_path: Path) -> None:
    tensors = convnext_tensors()
    tensors["stages.0.layers.0.depthwise_conv.weight"] = ("F32", ())
    files = {**convnext_repo_files(), "model.safetensors": safetensors_bytes(tensors)}
    root = _write(tmp_path / "dinov3", files)
    assert validate_dinov3(root) is False
    [problem] = find_problems(root)
    assert "stage 0 is 8 wide, its depthwise conv has no channels" in problem.message


def test_verify_reports_a_nested_header(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                        run_cli: Any) -> None:
    fetch_dinov3(dino_root, TINY)
    weights = dino_root / "model.safetensors"
    weights.write_bytes(_nested_header(weights.stat().st_size))  # same size: the manifest's check passes
    assert validate_dinov3(dino_root) is False
    report = verify_dinov3(dino_root)
    assert not report.ok and any("nested too deeply" in p.message for p in report.problems)
    proc = run_cli("verify", "--dino-root", str(dino_root), HF_HUB_OFFLINE="1")
    assert proc.returncode == 13, proc.stderr
    assert "nested too deeply" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr


def test_pipeline_config_nested_too_deeply(tmp_path: Path, run_cli: Any) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_bytes(b'{"train": ' * DEEP)
    proc = run_cli("--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "nested too deeply" in lines[0], proc.stderr


class _PublishWhileHashing(Progress):
    """A progress bar that, on the first block hashed, does what a concurrent fetch does: publish a manifest."""

    def __init__(self, state: StateDir) -> None:
        super().__init__(quiet=True)
        self.state = state
        self.published: bytes | None = None

    def advance(self, n: int) -> None:
        super().advance(n)
        if self.published is None:
            m = self.state.read_manifest()
            assert m is not None
            self.state.write_manifest(dataclasses.replace(m, commit="b" * 40, fetched_at=m.fetched_at + 1))
            self.published = self.state.manifest_path.read_bytes()


def test_verify_does_not_overwrite_a_manifest_published_meanwhile(hub: HubServer, tiny: dict[str, bytes],
                                                                 dino_root: Path) -> None:
    fetch_dinov3(dino_root, TINY)
    state = StateDir(dino_root)
    progress = _PublishWhileHashing(state)
    report = verify_dinov3(dino_root, deep=True, progress=progress)
    assert report.ok
    assert state.manifest_path.read_bytes() == progress.published
    assert json.loads(progress.published or b"")["commit"] == "b" * 40


def test_verify_records_only_when_the_lock_is_free(hub: HubServer, tiny: dict[str, bytes],
                                                   dino_root: Path) -> None:
    fetch_dinov3(dino_root, TINY)
    state = StateDir(dino_root)
    before = state.manifest_path.read_bytes()
    with FileLock(state.lock_path):  # a fetcher at work
        assert verify_dinov3(dino_root, deep=True).ok
        assert state.manifest_path.read_bytes() == before
    assert verify_dinov3(dino_root, deep=True).ok
    m = state.read_manifest()
    assert m is not None and m.verified_at is not None and m.verified_deep_at is not None


@pytest.mark.parametrize(("command", "damage"), [("fetch", "files-null"), ("fetch", "files-list"),
                                                ("fetch", "size-overflow"), ("info", "size-overflow"),
                                                ("verify", "files-list")])
def test_a_damaged_manifest_is_treated_as_absent(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                                 run_cli: Any, damage: str, command: str) -> None:
    fetch_dinov3(dino_root, TINY)
    mpath = dino_root / ".dinov3-fetcher" / "manifest.json"
    text = mpath.read_text()
    if damage == "files-null":
        text = json.dumps(json.loads(text) | {"files": None})
    elif damage == "files-list":
        text = json.dumps(json.loads(text) | {"files": []})
    else:
        text = re.sub(r'"size": \d+', '"size": 1e400', text, count=1)
    mpath.write_text(text)
    if command == "fetch":
        r = run_cli("--dino-root", str(dino_root), "--model", TINY)
        assert r.returncode == 0, r.stderr
        assert run_cli("verify", "--dino-root", str(dino_root)).returncode == 0
    elif command == "info":
        r = run_cli("info", "--dino-root", str(dino_root), "--model", TINY, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["repo_id"] is None
    else:
        r = run_cli("verify", "--dino-root", str(dino_root))
        assert r.returncode == 13, r.stderr
        assert "manifest" in error_line(r.stderr)
