"""The CLI as a user runs it: a real subprocess, exit codes, one-line errors, --json, every command."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

from checkpoints import vit_repo_files
from conftest import NOTGRANTED, TINY, checkpoint_tree
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher._errors import NetworkError
from dinov3_fetcher._progress import human_bytes
from helpers import dead_pid, error_line, plan, run_cli_here, tree
from hub_server import HubServer


def config(tmp_path: Path, **train: Any) -> Path:
    path = tmp_path / "proj" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"paths": {"dataset_root": "dataset"}, "train": {"dino_root": "dinov3", **train}}))
    return path


@pytest.fixture
def run_cli(run_cli: Any) -> Any:
    """This file tests the command line itself: each of its runs in a new interpreter, so that what a start-up
    and an exit do (imports, bytecode, the last writes before the interpreter ends) is the real thing."""
    return functools.partial(run_cli, fresh=True)


def test_fetch_from_config_prints_the_path(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    cfg = config(tmp_path, dino_model=TINY)
    r = run_cli("--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    root = tmp_path / "proj" / "dinov3"
    assert r.stdout.strip() == str(root)
    assert "sha256 verified" in r.stderr and TINY in r.stderr
    assert (root / "model.safetensors").read_bytes() == tiny["model.safetensors"]
    again = run_cli("--config", str(cfg), "--json")
    data = json.loads(again.stdout)
    assert again.returncode == 0 and data["ok"] and data["cached"] and data["path"] == str(root)


def test_python_dash_m_and_quiet(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    r = run_cli("fetch", "--dino-root", str(tmp_path / "d"), "--model", TINY, "-q")
    assert r.returncode == 0 and r.stderr == "" and r.stdout.strip() == str(tmp_path / "d")


@pytest.mark.parametrize(
    ("setup", "args", "code", "fragment"),
    [
        ("none", ["--config", "missing.json"], 3, "does not exist"),
        ("none", ["--dino-root", "d", "--model", "not-a-repo-id"], 3, "is not a Hub repo id"),
        ("gated", ["--dino-root", "d", "--model", TINY], 4, "no token was sent (401)"),
        ("gated-token", ["--dino-root", "d", "--model", TINY], 4, "not been granted access yet (403)"),
        ("tiny", ["--dino-root", "d", "--model", "nobody/dinov3-missing"], 5, "was not found"),
        ("tiny", ["--dino-root", "d", "--model", TINY, "--revision", "nope"], 6, "does not exist"),
        ("notdino", ["--dino-root", "d", "--model", TINY], 7, "not a DINOv3 model"),
        ("corrupt", ["--dino-root", "d", "--model", TINY], 8, "sha256"),
        ("tiny-offline", ["--dino-root", "d", "--model", TINY], 11, "HF_HUB_OFFLINE"),
        ("down", ["--dino-root", "d", "--model", TINY], 10, "cannot reach"),
        ("none", ["--bogus-flag"], 2, "unrecognized arguments"),
    ],
)
def test_errors_are_one_line_with_the_documented_exit_code(
    hub: HubServer, tmp_path: Path, run_cli: Any, monkeypatch: pytest.MonkeyPatch, setup: str, args: list[str],
    code: int, fragment: str
):
    env: dict[str, str | None] = {}
    files = vit_repo_files()
    if setup.startswith("gated"):
        hub.add_repo(TINY, files, gated=True)
        if setup == "gated-token":
            env["HF_TOKEN"] = NOTGRANTED
    elif setup.startswith("tiny"):
        hub.add_repo(TINY, files)
        if setup == "tiny-offline":
            env["HF_HUB_OFFLINE"] = "1"
    elif setup == "notdino":
        hub.add_repo(TINY, {**files, "config.json": b'{"model_type": "bert"}'})
    elif setup == "corrupt":
        hub.add_repo(TINY, files)
        hub.faults.add(corrupt_at=50, path_suffix="model.safetensors")
    elif setup == "down":
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens on the discard port
        env["DINOV3_FETCHER_RETRIES"] = "0"
    r = run_cli(*args, cwd=tmp_path, **env)
    assert r.returncode == code, r.stderr
    if code == 2:
        assert fragment in r.stderr and "Traceback" not in r.stderr
        return
    line = error_line(r.stderr)
    assert fragment in line
    assert r.stdout == ""
    monkeypatch.chdir(tmp_path)  # the same error as JSON (the same process would only pay the imports again)
    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    js_code, stdout, _ = run_cli_here([*args, "--json"])
    data = json.loads(stdout)
    assert js_code == code and data["ok"] is False and data["error"]["exit_code"] == code and data["error"]["hint"]
    assert stdout.count("\n{") == 0  # exactly one object


def test_debug_shows_the_traceback(hub: HubServer, tmp_path: Path, run_cli: Any):
    r = run_cli("--dino-root", "d", "--model", "nobody/dinov3-missing", "--debug", cwd=tmp_path)
    assert r.returncode == 5 and "Traceback" in r.stderr


def test_list(run_cli: Any):
    r = run_cli("list")
    assert r.returncode == 0 and "facebook/dinov3-vitl16-pretrain-lvd1689m" in r.stdout and "default" in r.stdout
    data = json.loads(run_cli("list", "--json").stdout)
    assert data["ok"] and len(data["variants"]) == 12
    assert [v["repo_id"] for v in data["variants"] if v["default"]] == ["facebook/dinov3-vitl16-pretrain-lvd1689m"]
    assert {v["repo_id"] for v in data["variants"] if v["sharded"]} == {
        "facebook/dinov3-vit7b16-pretrain-lvd1689m", "facebook/dinov3-vit7b16-pretrain-sat493m"}


def test_verify_quick_and_deep(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    root = tmp_path / "d"
    fetch_dinov3(root, TINY)
    r = run_cli("verify", "--dino-root", str(root))
    assert r.returncode == 0 and "passed quick" in r.stdout and "ok   model.safetensors" in r.stderr
    r = run_cli("verify", "--dino-root", str(root), "--deep", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["ok"] and all(f["detail"] == "sha256 ok" for f in data["files"])

    # a single flipped byte: the quick check cannot see it, --deep must
    weights = root / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert run_cli("verify", "--dino-root", str(root)).returncode == 0
    r = run_cli("verify", "--dino-root", str(root), "--deep")
    assert r.returncode == 13 and "FAIL model.safetensors" in r.stderr
    one = [line for line in r.stderr.splitlines() if line.startswith("dinov3-fetcher: error:")]
    assert len(one) == 1 and "deep" in one[0]
    assert "model.safetensors" in one[0] and "sha256" in one[0]
    assert "FileCheck(" not in one[0] and "name=" not in one[0]  # words, not a Python repr

    # a truncated file: the quick check catches it
    weights.write_bytes(bytes(raw[: len(raw) // 2]))
    r = run_cli("verify", "--dino-root", str(root), "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 13 and data["ok"] is False and "model.safetensors" in data["error"]["message"]


def test_info(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    cfg = config(tmp_path, dino_model=TINY)
    r = run_cli("info", "--config", str(cfg))
    assert r.returncode == 0 and "none recorded" in r.stdout and "does NOT match" in r.stdout
    assert run_cli("--config", str(cfg), "-q").returncode == 0
    r = run_cli("info", "--config", str(cfg))
    assert f"model:      {TINY}" in r.stdout and "matches, valid" in r.stdout and "model.safetensors" in r.stdout
    data = json.loads(run_cli("info", "--config", str(cfg), "--json").stdout)
    assert data["matches"] and data["repo_id"] == TINY and len(data["commit"]) == 40
    assert data["files"]["model.safetensors"]["size"] == len(tiny["model.safetensors"])
    other = json.loads(run_cli("info", "--config", str(cfg), "--model", "x/dinov3-other", "--json").stdout)
    assert other["matches"] is False


def test_dry_run_writes_nothing(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    root = tmp_path / "d"
    r = run_cli("--dino-root", str(root), "--model", TINY, "--dry-run", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 0 and data["dry_run"] and len(data["commit"]) == 40
    assert {f["name"] for f in data["files"]} == {"config.json", "preprocessor_config.json", "model.safetensors",
                                                  "README.md", "LICENSE.md"}
    assert data["bytes_to_download"] == sum(len(tiny[f["name"]]) for f in data["files"])
    assert data["free_bytes"] > 0
    assert not root.exists()
    assert not hub.file_gets()


def test_dry_run_writes_nothing_into_an_existing_dino_root(hub: HubServer, tmp_path: Path, run_cli: Any,
                                                           monkeypatch: pytest.MonkeyPatch):
    """A dead fetcher's staged file is not adopted and a SIGKILLed claim is counted, not moved."""
    from dinov3_fetcher._state import host, owner_tag

    _HOST = host()

    root = tmp_path / "d"
    v1 = vit_repo_files(hidden=256, intermediate=1024, layers=4, seed=1)  # ~ 13 MB
    hub.add_repo(TINY, v1)
    fetch_dinov3(root, TINY)
    v2 = vit_repo_files(hidden=256, intermediate=1024, layers=4, seed=2)
    readme = b"# new card\n"
    commit = hub.add_commit(TINY, {"model.safetensors": v2["model.safetensors"], "README.md": readme})
    hub.faults.add(cut_after=4_000_000, path_suffix="model.safetensors", host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):  # an update cut short: a partial download is left
        fetch_dinov3(root, TINY, update=True)
    state = root / ".dinov3-fetcher"
    (released,) = list((state / "partial").iterdir())
    progress = json.loads((released / "progress.json").read_bytes())
    have = progress["size"] - sum(e - s for s, e in progress["remaining"])
    pid = dead_pid()
    released.rename(released.with_name(f"{released.name}.{_HOST}.{pid}"))  # as a SIGKILL leaves it
    dead = state / "staged" / f"{_HOST}.{pid}"
    dead.mkdir(parents=True, exist_ok=True)
    oid = hashlib.sha1(b"blob %d\0" % len(readme) + readme).hexdigest()
    (dead / f"{oid}.README.md").write_bytes(readme)

    before, checkpoint = tree(root), checkpoint_tree(root)
    r = run_cli("--dino-root", str(root), "--model", TINY, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["commit"] == commit
    files = {f["name"]: f for f in data["files"]}
    assert files["model.safetensors"]["present"] == have > 0 and not files["model.safetensors"]["reuse"]
    assert files["README.md"]["reuse"] and files["config.json"]["reuse"]
    assert data["bytes_present"] == sum(f["present"] for f in data["files"])
    # this test process's own staged folder (README, fetched beside the weights of the update that failed) beats
    # while the process lives: its heartbeat is the test's doing, not the dry run's
    mine = f".dinov3-fetcher/staged/{owner_tag()}/heartbeat"
    assert {k: v for k, v in tree(root).items() if k != mine} == {k: v for k, v in before.items() if k != mine}
    assert checkpoint_tree(root) == checkpoint


def test_update_with_nothing_new_says_so(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any):
    root = tmp_path / "d"
    fetch_dinov3(root, TINY)
    hub.clear()
    r = run_cli("--dino-root", str(root), "--model", TINY, "--update")
    assert r.returncode == 0, r.stderr
    commit = json.loads((root / ".dinov3-fetcher" / "manifest.json").read_bytes())["commit"]
    assert f"up to date with {commit}, nothing downloaded" in r.stderr and "no request made" not in r.stderr
    assert not hub.file_gets()
    r = run_cli("--dino-root", str(root), "--model", TINY)
    assert "no request made" in r.stderr


def test_a_repo_without_config_json_is_not_dinov3(hub: HubServer, tmp_path: Path, run_cli: Any):
    hub.add_repo(TINY, {k: v for k, v in vit_repo_files().items() if k != "config.json"})
    r = run_cli("--dino-root", str(tmp_path / "d"), "--model", TINY)
    assert r.returncode == 7, r.stderr
    assert f"{TINY} has no config.json: not a transformers DINOv3 checkpoint" in error_line(r.stderr)


@pytest.mark.parametrize("command", ["verify", "info"])
def test_a_command_without_dino_root(run_cli: Any, tmp_path: Path, command: str):
    r = run_cli(command, cwd=tmp_path)
    assert r.returncode == 3 and "no dino_root given" in error_line(r.stderr)


def test_every_command_has_help_with_examples(run_cli: Any):
    for command in ("fetch", "list", "verify", "info"):
        r = run_cli(command, "--help")
        assert r.returncode == 0 and "examples:" in r.stdout and "--json" in r.stdout, command


def test_progress_bar_only_when_asked_off_a_terminal(hub: HubServer, tiny: dict[str, bytes], tmp_path: Path,
                                                     run_cli: Any):
    plain = run_cli("--dino-root", str(tmp_path / "a"), "--model", TINY)
    assert plain.returncode == 0 and "ETA" not in plain.stderr and "\r" not in plain.stderr  # stderr is a pipe
    total = sum(f.size for f in plan(tmp_path / "b", TINY).files)
    hub.faults.add(path_suffix="model.safetensors", host="cdn", throttle_bps=200_000)  # several bars
    bar = run_cli("--dino-root", str(tmp_path / "b"), "--model", TINY, "--progress")
    hub.faults.clear()
    assert bar.returncode == 0 and "ETA" in bar.stderr and "100.0%" in bar.stderr
    bars = re.findall(r"([\d.]+)% ([\d.]+ [KMGT]?B)/([\d.]+ [KMGT]?B)", bar.stderr)
    assert {b[2] for b in bars} == {human_bytes(total)}, bars  # the total covers every byte it counts
    assert bars[-1][:2] == ("100.0", human_bytes(total)), bars[-1]
    verbose = run_cli("--dino-root", str(tmp_path / "c"), "--model", TINY, "-v")
    per_file = [line for line in verbose.stderr.splitlines() if line.startswith("fetched ")]
    assert {line.split()[1] for line in per_file} == {"config.json", "preprocessor_config.json",
                                                      "model.safetensors", "README.md", "LICENSE.md"}
    assert all("sha256 verified" in line for line in per_file)


def test_a_fetch_writes_no_bytecode_where_the_user_said_not_to(hub: HubServer, tiny: dict[str, bytes],
                                                               dino_root: Path, run_cli: Any) -> None:
    # PYTHONDONTWRITEBYTECODE=1 (many training images) is respected at run time: the install compiles the
    # bytecode once (pyproject's [tool.uv] compile-bytecode, as pip does), a run never writes any.
    import importlib.util
    import site
    import sysconfig

    import huggingface_hub.hf_api

    # the install compiled it (uv sync / uv run with pyproject's [tool.uv] compile-bytecode): not a run
    compiled = Path(importlib.util.cache_from_source(huggingface_hub.hf_api.__file__))
    assert compiled.is_file(), f"no bytecode for huggingface_hub at {compiled}: was the venv installed by uv sync?"

    roots = [Path(p) for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if Path(p).is_dir()]
    roots.append(Path(__file__).resolve().parent.parent / "src")

    def pyc() -> dict[Path, int]:
        return {p: p.stat().st_mtime_ns for r in roots for p in r.rglob("*.pyc")}

    before = pyc()
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, PYTHONDONTWRITEBYTECODE="1")
    assert r.returncode == 0, r.stderr
    assert validate_dinov3(dino_root)
    after = pyc()
    assert {p for p in after if before.get(p) != after[p]} == set()


def test_verify_of_a_missing_folder_says_so(tmp_path: Path, run_cli: Any):
    r = run_cli("verify", "--dino-root", str(tmp_path / "nowhere"))
    assert r.returncode == 13, r.stderr
    line = error_line(r.stderr)
    message = line.split(" -> ")[0]
    assert "is not a folder" in message or "does not exist" in message
    assert "manifest" not in message
    assert "repair" not in line


def test_offline_update_of_a_complete_checkpoint_says_why_it_cannot(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any):
    fetch_dinov3(dino_root, TINY)
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--update", HF_HUB_OFFLINE="1")
    assert r.returncode == 11, r.stderr
    line = error_line(r.stderr)
    assert "not a complete checkpoint" not in line
    assert "--update" in line and "HF_HUB_OFFLINE" in line
