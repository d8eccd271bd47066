"""Is a copy Meta's release? The pinned sha256s of the registry, compared after every fetch from any source.

The tests never depend on the real hashes: ``DINOV3_FETCHER_REGISTRY`` (a JSON file, read at call time by the
library and by the CLI subprocesses alike) pins the tiny test checkpoint, or overrides an official id's pin.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from checkpoints import vit_repo_files
from conftest import TINY, checkpoint_tree
from dinov3_fetcher import IntegrityError
from helpers import fetch
from hub_server import HubServer
from modelscope_server import ModelScopeServer

MODEL = "model.safetensors"
FILES = vit_repo_files()
OTHER = vit_repo_files(seed=5)  # a re-upload with other weights (same shapes)
SHA = hashlib.sha256(FILES[MODEL]).hexdigest()
OTHER_SHA = hashlib.sha256(OTHER[MODEL]).hexdigest()
VITS = "facebook/dinov3-vits16-pretrain-lvd1689m"


@pytest.fixture
def ms(ms: ModelScopeServer) -> ModelScopeServer:
    ms.add_repo(TINY, FILES)
    return ms


@pytest.fixture
def pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``pin({repo_id: entry})`` writes the override file and points DINOV3_FETCHER_REGISTRY at it."""
    path = tmp_path / "registry.json"

    def write(entries: dict[str, Any]) -> Path:
        path.write_text(json.dumps(entries))
        monkeypatch.setenv("DINOV3_FETCHER_REGISTRY", str(path))
        return path

    return write


def manifest(dino_root: Path) -> dict[str, Any]:
    return json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_bytes())


def cli_fetch(run_cli: Any, dino_root: Path, source: str, *args: str, **env: str | None) -> Any:
    return run_cli("--dino-root", str(dino_root), "--model", TINY, "--source", source, *args, **env)


@pytest.mark.parametrize("source", ["modelscope", "hf"])
def test_same_sha256_says_identical_to_the_release(run_cli: Any, ms: ModelScopeServer, hub: HubServer,
                                                   pin: Any, dino_root: Path, source: str) -> None:
    hub.add_repo(TINY, FILES)
    pin({TINY: {"sha256": SHA, "size": len(FILES[MODEL])}})
    r = cli_fetch(run_cli, dino_root, source)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "Meta" in ln]
    assert lines == [f"{TINY}: identical to Meta's release, sha256 {SHA[:8]}..."]
    assert manifest(dino_root)["official"] is True
    r = cli_fetch(run_cli, dino_root, source, "--json")  # a warm run says it too
    out = json.loads(r.stdout)
    assert out["cached"] and out["official"] is True and out["official_check"].startswith("identical to Meta's")


def test_other_weights_warn_in_one_line_and_are_recorded(run_cli: Any, ms: ModelScopeServer, pin: Any,
                                                        dino_root: Path) -> None:
    pin({TINY: {"sha256": OTHER_SHA, "size": None, "commits": ["a" * 40]}})
    r = cli_fetch(run_cli, dino_root, "modelscope", "--json")
    assert r.returncode == 0, r.stderr
    warning = f"{TINY}: warning: these are NOT Meta's official weights of {TINY}: " \
              f"sha256 {SHA[:8]}... differs from the release's {OTHER_SHA[:8]}..."
    assert [ln for ln in r.stderr.splitlines() if "Meta" in ln] == [warning]
    out = json.loads(r.stdout)
    assert out["official"] is False and "NOT Meta's official weights" in out["official_check"]
    assert manifest(dino_root)["official"] is False
    assert (dino_root / MODEL).read_bytes() == FILES[MODEL]  # without --require-official: published, warned
    info = run_cli("info", "--dino-root", str(dino_root), "--model", TINY, "--source", "modelscope", "--json")
    got = json.loads(info.stdout)
    assert got["official"] is False
    assert (got["official_check"]["sha256"], got["official_check"]["expected_sha256"]) == (SHA, OTHER_SHA)
    human = run_cli("info", "--dino-root", str(dino_root), "--model", TINY, "--source", "modelscope").stdout
    assert f"official:   these are NOT Meta's official weights of {TINY}" in human


def test_require_official_refuses_with_8_and_keeps_the_old_checkpoint(run_cli: Any, ms: ModelScopeServer,
                                                                      pin: Any, tmp_path: Path,
                                                                      dino_root: Path) -> None:
    pin({TINY: {"sha256": SHA}})
    r = cli_fetch(run_cli, dino_root, "modelscope", "-q", "--require-official")
    assert r.returncode == 0, r.stderr  # the release: accepted
    before = checkpoint_tree(dino_root)
    ms.add_commit(TINY, {MODEL: OTHER[MODEL]})  # the branch now holds other weights
    r = cli_fetch(run_cli, dino_root, "modelscope", "--update", "--require-official", "--json")
    assert r.returncode == 8, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "IntegrityError" and "NOT Meta's official weights" in err["message"]
    assert "nothing was published" in err["message"]
    assert checkpoint_tree(dino_root) == before  # byte for byte, manifest included
    assert manifest(dino_root)["official"] is True
    # the same refusal from the config, into an empty dino_root: nothing at all is published
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"train": {"dino_root": "fresh", "dino_model": TINY, "dino_source": "modelscope",
                                         "dino_require_official": True}}))
    r = run_cli("--config", str(cfg))
    assert r.returncode == 8, r.stderr
    fresh = tmp_path / "fresh"
    assert not (fresh / MODEL).exists() and not (fresh / ".dinov3-fetcher" / "manifest.json").exists()
    # without the requirement the same copy is published, with its warning
    cfg.write_text(json.dumps({"train": {"dino_root": "fresh", "dino_model": TINY, "dino_source": "modelscope"}}))
    r = run_cli("--config", str(cfg))
    assert r.returncode == 0 and "NOT Meta's official weights" in r.stderr
    assert (fresh / MODEL).read_bytes() == OTHER[MODEL]


def test_require_official_without_a_pinned_sha256_refuses(ms: ModelScopeServer, dino_root: Path) -> None:
    with pytest.raises(IntegrityError, match="no pinned sha256"):
        fetch(dino_root, TINY, source="modelscope", require_official=True)
    assert not (dino_root / MODEL).exists()
    result = fetch(dino_root, TINY, source="modelscope")
    assert (result.official, result.official_message) == (None, "")


def test_a_copy_under_another_id_is_recognised_as_the_release(ms: ModelScopeServer, pin: Any,
                                                              dino_root: Path) -> None:
    pin({VITS: {"sha256": SHA, "size": len(FILES[MODEL])}})  # as if the tiny weights were ViT-S/16's
    result = fetch(dino_root, TINY, source="modelscope", require_official=True)
    assert result.official is True
    assert result.official_message == f"identical to Meta's release of {VITS}, sha256 {SHA[:8]}..."


def test_verify_reports_the_comparison_offline(run_cli: Any, ms: ModelScopeServer, pin: Any,
                                               dino_root: Path) -> None:
    pin({TINY: {"sha256": SHA}})
    assert cli_fetch(run_cli, dino_root, "modelscope", "-q").returncode == 0
    ms.clear()
    r = run_cli("verify", "--dino-root", str(dino_root), "--deep", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["official"] is True and out["official_check"] == f"identical to Meta's release, sha256 {SHA[:8]}..."
    pin({TINY: {"sha256": OTHER_SHA}})
    r = run_cli("verify", "--dino-root", str(dino_root))
    assert r.returncode == 0, r.stderr  # verify reports; it is not an integrity failure of the folder
    assert f"{TINY}: warning: these are NOT Meta's official weights" in r.stdout
    assert ms.requests == []


def test_list_shows_the_pins_and_leaves_unknown_values_unknown(run_cli: Any, pin: Any) -> None:
    fake = "ab" * 32
    pin({VITS: {"sha256": fake, "size": 12345, "commits": ["c" * 40]}})
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    by_id = {v["repo_id"]: v for v in json.loads(r.stdout)["variants"]}
    assert by_id[VITS]["release"] == {"commits": ["c" * 40], "file": MODEL, "size": 12345, "sha256": fake}
    vitl = by_id["facebook/dinov3-vitl16-pretrain-lvd1689m"]["release"]  # built in: two commits, one file
    assert len(vitl["commits"]) == 2 and len(vitl["sha256"]) == 64 and vitl["size"] == 1212559808
    assert by_id["facebook/dinov3-vith16plus-pretrain-lvd1689m"]["release"]["size"] is None  # not known
    assert by_id["facebook/dinov3-vit7b16-pretrain-lvd1689m"]["release"]["sha256"] is None
    assert by_id["facebook/dinov3-convnext-tiny-pretrain-lvd1689m"]["release"] is None  # nothing known
    human = run_cli("list").stdout
    row = next(ln for ln in human.splitlines() if ln.startswith(VITS + " "))
    assert "abababab..." in row
    assert "unknown" in next(ln for ln in human.splitlines() if "convnext-tiny" in ln)


def test_a_malformed_registry_file_is_a_config_error(run_cli: Any, pin: Any) -> None:
    pin({VITS: {"sha256": "not-a-hash"}})
    r = run_cli("list")
    assert r.returncode == 3 and "DINOV3_FETCHER_REGISTRY" in r.stderr


@pytest.mark.parametrize("kind", ["fifo", "folder", "nested", "huge-integer"])
def test_a_registry_file_that_cannot_be_read_is_refused_naming_it(run_cli: Any, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "registry.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"[" * 200_000 if kind == "nested" else b'{"a/b": {"size": ' + b"9" * 5000 + b"}}")
    for args in (["list"], ["--dino-root", str(tmp_path / "dinov3"), "--model", TINY]):
        r = run_cli(*args, DINOV3_FETCHER_REGISTRY=str(path), timeout=60)
        assert r.returncode == 3, r.stderr
        line = r.stderr.strip()
        assert line.startswith(f"dinov3-fetcher: error: DINOV3_FETCHER_REGISTRY={path}: the file ") and \
            "\n" not in line, r.stderr
        assert {"fifo": "is a FIFO", "folder": "is a folder", "nested": "nested too deeply",
                "huge-integer": "number too long"}[kind] in line


def test_a_registry_file_over_a_mebibyte_is_read(run_cli: Any, pin: Any) -> None:
    entries = {f"org/copy-{i:05d}": {"sha256": f"{i:064x}", "size": i} for i in range(12_000)}
    path = pin({**entries, VITS: {"sha256": "cd" * 32, "size": 7}})
    assert path.stat().st_size > 1 << 20
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    by_id = {v["repo_id"]: v for v in json.loads(r.stdout)["variants"]}
    assert by_id[VITS]["release"]["sha256"] == "cd" * 32


def test_a_malformed_pin_is_refused_before_any_download(run_cli: Any, ms: ModelScopeServer, hub: HubServer,
                                                       pin: Any, dino_root: Path) -> None:
    hub.add_repo(TINY, FILES)
    pin({TINY: {"sha256": "abc"}})
    for source, server in (("hf", hub), ("modelscope", ms)):
        r = cli_fetch(run_cli, dino_root, source)
        assert r.returncode == 3 and f"{TINY}: sha256 must be 64 lower-case hex digits" in r.stderr, r.stderr
        assert server.requests == [] and not dino_root.exists()


def test_the_right_sha256_with_a_wrong_pinned_size_says_the_size(run_cli: Any, ms: ModelScopeServer, pin: Any,
                                                                 dino_root: Path) -> None:
    size = len(FILES[MODEL])
    pin({TINY: {"sha256": SHA, "size": size + 1}})
    r = cli_fetch(run_cli, dino_root, "modelscope")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if "Meta" in ln)
    assert f"{MODEL} has {size} bytes, the release {size + 1}" in line and "the pinned size is wrong" in line
    assert "differs from the release's" not in line


def test_dry_run_tells_from_the_listing_before_any_byte_moves(run_cli: Any, ms: ModelScopeServer, pin: Any,
                                                              dino_root: Path) -> None:
    pin({TINY: {"sha256": SHA}})
    r = cli_fetch(run_cli, dino_root, "modelscope", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["official"] is True
    assert f"by the listing's sha256, identical to Meta's release, sha256 {SHA[:8]}..." in r.stderr
    pin({TINY: {"sha256": OTHER_SHA}})
    r = cli_fetch(run_cli, dino_root, "modelscope", "--dry-run", "--json")
    assert json.loads(r.stdout)["official"] is False
    assert ms.file_gets() == [] and not dino_root.exists()
