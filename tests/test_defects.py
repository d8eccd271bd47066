"""Issue 11: the defects found by trying to break the fetcher, one test per item (families parametrized).

Each test drives the real CLI (a subprocess) or ``fetch_dinov3`` against the Hub emulator and checks what a
user would notice: the exit code (the README's table), the one error line and its fix, the files on disk, and
what the emulator served. Where the issue leaves the target behaviour open, the choice is written next to the
test. Tests that need root (a tmpfs, a UTS namespace) skip without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from checkpoints import shard_files, vit_repo_files
from conftest import GRANTED, TINY, cli_env
from hub_server import HubServer

MODEL = "model.safetensors"
KB = 1000
ROOT = Path(__file__).resolve().parents[1]
MAIN = [sys.executable, "-m", "dinov3_fetcher"]


# -- helpers -------------------------------------------------------------------------------------------------

def fetch(run_cli: Any, root: Path, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    return run_cli("--dino-root", str(root), "--model", TINY, *args, **env)


def error_line(r: subprocess.CompletedProcess[str]) -> str:
    """The one error line on stderr (fails when there is none or more than one)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dinov3-fetcher: error:")]
    assert len(lines) == 1, r.stderr
    assert " -> " in lines[0], f"no fix given: {lines[0]}"
    return lines[0]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fetched(tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> Path:
    r = fetch(run_cli, dino_root)
    assert r.returncode == 0, r.stderr
    return dino_root



def fill_inodes(where: Path) -> int:
    where.mkdir()
    n = 0
    while True:
        try:
            (where / str(n)).touch()
        except OSError:
            return n
        n += 1


def fill_bytes(path: Path) -> None:
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 65536)
            except OSError:
                break
    with open(path.with_suffix(".small"), "wb", buffering=0) as f:  # the last partial block
        while True:
            try:
                f.write(b"\0")
            except OSError:
                return


# -- 1. a dino_root the tool did not create: never replace the user's files ----------------------------------
# Choice: a dino_root without a state folder (.dinov3-fetcher/) that holds files named like the checkpoint's
# is refused with a ConfigError (exit 3) naming those files, before anything is downloaded.

@pytest.mark.parametrize("case", ["dot-root-of-the-pipeline", "user-model-safetensors", "user-preprocessor"])
def test_item01_fetch_never_replaces_files_it_did_not_put_there(
        hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any, case: str) -> None:
    project = tmp_path / "project"
    project.mkdir()
    if case == "dot-root-of-the-pipeline":
        (project / "config.json").write_text(json.dumps({"train": {"dino_root": ".", "lr": 0.1}}))
        (project / "README.md").write_text("# my training pipeline\n")
        args: list[str] = ["--config", str(project / "config.json"), "--model", TINY]
        named = ["config.json", "README.md"]
    elif case == "user-model-safetensors":
        (project / MODEL).write_bytes(b"my student's weights" * 100)
        args, named = ["--dino-root", str(project), "--model", TINY], [MODEL]
    else:
        (project / "preprocessor_config.json").write_text('{"mine": true}')
        args, named = ["--dino-root", str(project), "--model", TINY], ["preprocessor_config.json"]
    before = tree_bytes(project)
    r = run_cli(*args)
    assert tree_bytes(project) == before, "a file the tool did not put there was replaced"
    assert r.returncode == 3, r.stderr
    line = error_line(r)
    for name in named:
        assert name in line


# -- 2. bytes altered, size unchanged: the documented repair must repair -------------------------------------
# Choice: `dinov3-fetcher --repair` re-hashes every file and re-downloads only the wrong ones, and verify's hint
# names it; a plain fetch after `verify --deep` found a bad file re-downloads it too (verify remembers).

@pytest.mark.parametrize("how", ["--repair", "fetch-after-verify-deep"])
def test_item02_altered_file_of_the_same_size_is_repaired(
        hub: HubServer, tiny: dict[str, bytes], fetched: Path, run_cli: Any, how: str) -> None:
    model = fetched / MODEL
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    v = run_cli("verify", "--dino-root", str(fetched), "--deep")
    assert v.returncode == 13, v.stderr
    assert "dinov3-fetcher --repair" in error_line(v) or how != "--repair"
    hub.clear()
    r = fetch(run_cli, fetched, *([how] if how == "--repair" else []))
    assert r.returncode == 0, r.stderr
    assert sha(model.read_bytes()) == sha(tiny[MODEL]), "the altered file is still there"
    assert hub.bytes_served() == len(tiny[MODEL]), "more than the one wrong file was downloaded"
    assert run_cli("verify", "--dino-root", str(fetched), "--deep").returncode == 0


# -- 3. two hosts, no working lock: a live claim is never adopted --------------------------------------------
# Covered in tests/test_data_safety.py (test_another_hosts_live_claim_is_never_taken and the copy-adoption
# tests): two real fetcher processes named host-a / host-b, whose liveness is judged by heartbeats, not times.


# -- 4. links in the state folder: nothing outside dino_root is deleted or written ---------------------------
# Either choice passes: the fetch succeeds without following the link, or refuses (exit 3) naming it.

@pytest.mark.parametrize("link", ["partial", "staged", "partial/<id>", "staged/<owner>"])
def test_item04_links_in_the_state_folder_are_never_followed(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, tmp_path: Path, run_cli: Any, link: str) -> None:
    outside = tmp_path / "shared"
    (outside / "other-project").mkdir(parents=True)
    (outside / "other-project" / "weights.bin").write_bytes(b"another user's data" * 50)
    (outside / "notes.txt").write_text("keep me\n")
    (outside / "data").write_bytes(b"precious" * 1000)
    state = dino_root / ".dinov3-fetcher"
    (state / "partial").mkdir(parents=True)
    (state / "staged").mkdir()
    model_id = sha(tiny[MODEL])
    if link in ("partial", "staged"):
        (state / link).rmdir()
        (state / link).symlink_to(outside, target_is_directory=True)
    elif link == "partial/<id>":
        (state / "partial" / model_id).symlink_to(outside, target_is_directory=True)
    else:  # a staged folder named like a dead fetcher's on another host
        (state / "staged" / "otherhost.1").symlink_to(outside, target_is_directory=True)
    before = tree_bytes(outside)
    r = fetch(run_cli, dino_root)
    assert tree_bytes(outside) == before, "a file outside dino_root was written, moved or deleted"
    if r.returncode == 3:
        assert ".dinov3-fetcher" in error_line(r)
    else:
        assert r.returncode == 0, r.stderr
        assert sha((dino_root / MODEL).read_bytes()) == sha(tiny[MODEL])


# -- 5. published files follow the umask -------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_item05_published_files_follow_the_umask(hub: HubServer, dino_root: Path, run_cli: Any, umask: int) -> None:
    hub.add_repo(TINY, shard_files(vit_repo_files(), 2))
    old = os.umask(umask)
    try:
        r = fetch(run_cli, dino_root)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in dino_root.iterdir() if p.is_file()}
    assert "config.json" in modes and "model.safetensors.index.json" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask), modes


# -- 6. a metadata answer that never comes is bounded by DINOV3_FETCHER_TIMEOUT ----------------------------

def test_item06_metadata_request_that_never_answers_times_out(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    release = threading.Event()
    hub.model_info_hook = lambda: release.wait(60)
    try:
        r = fetch(run_cli, dino_root, timeout=15, DINOV3_FETCHER_TIMEOUT="1", DINOV3_FETCHER_RETRIES="1")
    except subprocess.TimeoutExpired:
        pytest.fail("the fetch hung on a metadata request that never answers")
    finally:
        release.set()
    assert r.returncode == 10, r.stderr
    assert "127.0.0.1" in error_line(r)


# -- 7. the metadata request is retried like the bytes -----------------------------------------------------

@pytest.mark.parametrize("fault", ["429-retry-after", "503", "connection-reset"])
def test_item07_metadata_request_is_retried(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, fault: str) -> None:
    answers: list[Any] = [{"429-retry-after": (429, {"Retry-After": "1"}), "503": (503, {}),
                           "connection-reset": "reset"}[fault]]
    hub.model_info_hook = lambda: answers.pop() if answers else None
    r = fetch(run_cli, dino_root)
    assert r.returncode == 0, r.stderr
    assert not answers
    assert sha((dino_root / MODEL).read_bytes()) == sha(tiny[MODEL])


# -- 8. a listing bigger than the file: the integrity error, not endless retries -----------------------------

def test_item08_listing_bigger_than_the_file_is_an_integrity_error(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    hub.listed_sizes[f"{TINY}/{MODEL}"] = len(tiny[MODEL]) + 1000
    for _ in range(2):
        r = fetch(run_cli, dino_root)
        assert r.returncode == 8, r.stderr
        assert MODEL in error_line(r)
    assert not (dino_root / MODEL).exists()


# -- 9. no space / no inodes outside the data writes: exit 9 ------------------------------------------------

@pytest.mark.parametrize("case", ["no-inode-for-the-lock", "no-inode-for-staging", "no-space-for-small-files"])
def test_item09_no_space_or_inodes_anywhere_is_the_disk_error(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any, case: str) -> None:
    disk = tmpfs("8m", 64 if "inode" in case else None)
    root = disk / "dinov3"
    state = root / ".dinov3-fetcher"
    (state / "partial").mkdir(parents=True)
    (state / "staged").mkdir()
    if case != "no-inode-for-the-lock":
        (state / "lock").touch()
    if "inode" in case:
        assert fill_inodes(disk / "ballast") > 0
    else:
        fill_bytes(disk / "ballast")
    r = fetch(run_cli, root)
    assert r.returncode == 9, r.stderr
    assert str(root) in error_line(r)
    assert not (root / MODEL).exists()


# -- 10. a read-only dino_root: exit 3, files unchanged ----------------------------------------------------

@pytest.mark.parametrize("case", ["--update", "model-switch"])
def test_item10_read_only_dino_root_is_a_config_error(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any, case: str) -> None:
    disk = tmpfs("32m")  # the tiny checkpoint plus the 16 MiB space margin
    root = disk / "dinov3"
    assert fetch(run_cli, root).returncode == 0
    before = tree_bytes(root)
    r0 = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if r0.returncode:
        pytest.skip(f"cannot remount read-only: {r0.stderr}")
    if case == "--update":
        hub.add_commit(TINY, {"README.md": b"# a new model card\n"})
        r = fetch(run_cli, root, "--update")
    else:
        hub.add_repo("tiny-org/other", vit_repo_files(seed=3))
        r = run_cli("--dino-root", str(root), "--model", "tiny-org/other")
    assert tree_bytes(root) == before
    assert r.returncode == 3, r.stderr
    assert "read-only" in error_line(r)


# -- 11. the exit-1 family: each names its problem with its documented exit code ---------------------------
# Choice: a redirect the client cannot follow is an unsafe answer from the server: IntegrityError family (8).

@pytest.mark.parametrize("location", ["ftp://127.0.0.2/lfs/x?X-Amz-Signature=s", "http://[::1/lfs/x",
                                      "http://127.0.0.2:99999/lfs/x"])
def test_item11_redirect_to_a_bad_location_is_named(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, location: str) -> None:
    hub.redirect_location = lambda _: location
    r = fetch(run_cli, dino_root, DINOV3_FETCHER_RETRIES="1")
    assert r.returncode == 8, r.stderr
    line = error_line(r)
    assert "redirect" in line and "X-Amz-Signature" not in line
    assert not (dino_root / MODEL).exists()


@pytest.mark.parametrize("value", ["nan"])
def test_item11_odd_retry_after_is_a_short_wait(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, value: str) -> None:
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, status=503, retry_after=value)
    r = fetch(run_cli, dino_root, timeout=60)
    assert r.returncode == 0, r.stderr
    cdn = [g.status for g in hub.file_gets(MODEL) if g.host == "cdn"]
    assert cdn[:1] == [503] and 200 in cdn[1:], cdn  # the CDN's 503, then the retry (after a short wait)


def test_item11_staging_name_longer_than_255_bytes(hub: HubServer, dino_root: Path, run_cli: Any) -> None:
    files = shard_files(vit_repo_files(), 2)
    long = "w" * 200 + "-00001-of-00002.safetensors"  # 227 bytes: a valid file name, not with a 65-byte prefix
    files[long] = files.pop("model-00001-of-00002.safetensors")
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"] = {k: long if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo(TINY, files)
    r = fetch(run_cli, dino_root)
    assert r.returncode == 0, r.stderr
    assert (dino_root / long).read_bytes() == files[long]


def test_item11_hf_hub_download_timeout_with_a_fraction(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    r = fetch(run_cli, dino_root, HF_HUB_DOWNLOAD_TIMEOUT="1.5", DINOV3_FETCHER_TIMEOUT=None)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value", ["-1", "0"])
def test_item11_non_positive_timeout_is_a_config_error(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, value: str) -> None:
    r = fetch(run_cli, dino_root, DINOV3_FETCHER_TIMEOUT=value)
    assert r.returncode == 3, r.stderr
    assert "DINOV3_FETCHER_TIMEOUT" in error_line(r)
    assert not hub.requests


def test_item11_lock_is_a_symlink(hub: HubServer, tiny: dict[str, bytes], dino_root: Path, tmp_path: Path,
                                  run_cli: Any) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file\n")
    (dino_root / ".dinov3-fetcher").mkdir(parents=True)
    (dino_root / ".dinov3-fetcher" / "lock").symlink_to(victim)
    r = fetch(run_cli, dino_root)
    assert victim.read_text() == "a user's file\n"
    assert r.returncode == 3, r.stderr
    assert "lock" in error_line(r)


def test_item11_model_file_name_taken_by_a_folder(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    (dino_root / MODEL).mkdir(parents=True)
    (dino_root / MODEL / "x").write_text("x")
    for _ in range(2):
        r = fetch(run_cli, dino_root)
        assert r.returncode == 3, r.stderr
        assert MODEL in error_line(r)
    assert hub.bytes_served(MODEL) == 0, "the weights were downloaded before the folder was noticed"
    assert (dino_root / MODEL / "x").read_text() == "x"


@pytest.mark.parametrize(("command", "damage"), [("fetch", "files-null"), ("fetch", "files-list"),
                                                ("fetch", "size-overflow"), ("info", "size-overflow"),
                                                ("verify", "files-list")])
def test_item11_damaged_manifest_is_treated_as_absent(
        hub: HubServer, tiny: dict[str, bytes], fetched: Path, run_cli: Any, damage: str, command: str) -> None:
    mpath = fetched / ".dinov3-fetcher" / "manifest.json"
    text = mpath.read_text()
    if damage == "files-null":
        text = json.dumps(json.loads(text) | {"files": None})
    elif damage == "files-list":
        text = json.dumps(json.loads(text) | {"files": []})
    else:
        text = re.sub(r'"size": \d+', '"size": 1e400', text, count=1)
    mpath.write_text(text)
    if command == "fetch":
        r = fetch(run_cli, fetched)
        assert r.returncode == 0, r.stderr
        assert run_cli("verify", "--dino-root", str(fetched)).returncode == 0
    elif command == "info":
        r = run_cli("info", "--dino-root", str(fetched), "--model", TINY, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["repo_id"] is None
    else:
        r = run_cli("verify", "--dino-root", str(fetched))
        assert r.returncode == 13, r.stderr
        assert "manifest" in error_line(r)


# -- 12. HF_ENDPOINT with user:password: refused, nothing sent ------------------------------------------------
# Choice: refused as a ConfigError (exit 3) before any request; the password is never printed.

def test_item12_endpoint_with_credentials_is_refused(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    url = hub.endpoint.replace("http://", "http://user:s3cretpw@")
    r = fetch(run_cli, dino_root, "--json", HF_ENDPOINT=url)
    assert r.returncode == 3, r.stderr
    assert "HF_ENDPOINT" in error_line(r)
    assert "s3cretpw" not in r.stderr + r.stdout
    assert not hub.requests


# -- 13. signed URLs: host and path only, never the query -------------------------------------------------------

@pytest.mark.parametrize("flags", [[], ["--json"], ["--debug"]])
def test_item13_signed_cdn_url_is_never_printed_whole(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, flags: list[str]) -> None:
    signed = f"{hub.endpoint}/{TINY}/resolve/main/{MODEL}?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=f00d"
    hub.redirect_location = lambda _: signed  # a redirect loop through a signed URL: "too many redirects"
    r = fetch(run_cli, dino_root, *flags, DINOV3_FETCHER_RETRIES="1")
    assert r.returncode == 10, r.stderr
    out = r.stdout + r.stderr
    assert "X-Amz-" not in out and "Signature" not in out
    assert "127.0.0.1" in error_line(r)


# -- 14. offline --update on a complete checkpoint: a true message -----------------------------------------

def test_item14_offline_update_says_why(fetched: Path, run_cli: Any) -> None:
    r = fetch(run_cli, fetched, "--update", HF_HUB_OFFLINE="1")
    assert r.returncode == 11, r.stderr
    line = error_line(r)
    assert "not a complete checkpoint" not in line
    assert "--update" in line and "HF_HUB_OFFLINE" in line


# -- 15. a malformed revision is a config error, not a request --------------------------------------------

@pytest.mark.parametrize("rev", ["bad rev", "../x", "x~1", "main/"])
def test_item15_malformed_revision_is_refused_locally(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, rev: str) -> None:
    r = fetch(run_cli, dino_root, f"--revision={rev}")
    assert r.returncode == 3, r.stderr
    assert "revision" in error_line(r)
    assert not hub.requests


# -- 16. the disk-space refusal states the margin it applies ------------------------------------------------

def test_item16_space_refusal_names_the_margin(
        hub: HubServer, tiny: dict[str, bytes], tmpfs: Callable[..., Path], run_cli: Any) -> None:
    from dinov3_fetcher._progress import human_bytes
    from dinov3_fetcher._state import SPACE_MARGIN

    root = tmpfs("4m") / "dinov3"
    r = fetch(run_cli, root)
    assert r.returncode == 9, r.stderr
    line = error_line(r)
    assert "margin" in line and human_bytes(SPACE_MARGIN) in line, line


# -- 17. verify's messages ---------------------------------------------------------------------------------

def test_item17_verify_error_line_has_no_python_repr(fetched: Path, run_cli: Any) -> None:
    model = fetched / MODEL
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    r = run_cli("verify", "--dino-root", str(fetched), "--deep")
    assert r.returncode == 13, r.stderr
    line = error_line(r)
    assert "FileCheck(" not in line and "name=" not in line
    assert MODEL in line and "sha256" in line


def test_item17_verify_on_a_missing_folder(tmp_path: Path, run_cli: Any) -> None:
    r = run_cli("verify", "--dino-root", str(tmp_path / "nowhere"))
    assert r.returncode == 13, r.stderr
    line = error_line(r)
    message = line.split(" -> ")[0]
    assert "is not a folder" in message or "does not exist" in message
    assert "manifest" not in message
    assert "repair" not in line


# -- 18. the progress bar's total covers every byte it counts ------------------------------------------------

def test_item18_progress_total_is_never_below_what_it_counts(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    from dinov3_fetcher._progress import human_bytes

    dry = fetch(run_cli, dino_root, "--dry-run", "--json")
    total = sum(f["size"] for f in json.loads(dry.stdout)["files"])
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=200_000)
    r = fetch(run_cli, dino_root, "--progress")
    assert r.returncode == 0, r.stderr
    bars = re.findall(r"([\d.]+)% ([\d.]+ [KMGT]?B)/([\d.]+ [KMGT]?B)", r.stderr)
    assert bars, r.stderr
    assert {b[2] for b in bars} == {human_bytes(total)}, bars
    assert bars[-1][:2] == ("100.0", human_bytes(total)), bars[-1]


# -- 19. a failed first fetch leaves nothing behind ---------------------------------------------------------

@pytest.mark.parametrize("case", ["repo-not-found", "gated-without-token"])
def test_item19_failed_first_fetch_leaves_no_state_folder(
        hub: HubServer, dino_root: Path, run_cli: Any, case: str) -> None:
    files = vit_repo_files()
    if case == "gated-without-token":
        hub.add_repo(TINY, files, gated=True)
    r = fetch(run_cli, dino_root)
    assert r.returncode == {"repo-not-found": 5, "gated-without-token": 4}[case], r.stderr
    assert not dino_root.exists(), sorted(p.relative_to(dino_root).as_posix() for p in dino_root.rglob("*"))


# -- 20. the --load hint says what works ---------------------------------------------------------------------

def test_item20_load_hint_points_at_the_cpu_wheel(fetched: Path, run_cli: Any) -> None:
    r = run_cli("verify", "--dino-root", str(fetched), "--load")
    if r.returncode == 0:
        pytest.skip("torch is installed here: the hint is not shown")
    assert r.returncode == 14, r.stderr
    line = error_line(r)
    assert "uv sync --extra load" not in line
    assert "download.pytorch.org/whl/cpu" in line


# -- 21. the README's session can be replayed from the README alone -------------------------------------------

def test_item21_serve_py_prints_what_a_newcomer_needs(tmp_path: Path, run_cli: Any) -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "serve.py")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 15
        while not any("Ctrl-C" in ln for ln in lines) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert any("Ctrl-C" in ln for ln in lines), f"serve.py does not say how to stop it: {lines}"
        text = "".join(lines)
        export = next(ln for ln in lines if ln.startswith("export HF_ENDPOINT=http://127.0.0.1:"))
        for name in ("tiny-org/dinov3-vit-tiny", "tiny-org/dinov3-vit-gated", "tiny-org/dinov3-convnext-sharded",
                     GRANTED):
            assert name in text, text
        endpoint = export.strip().split("=", 1)[1]
        r = run_cli("--dino-root", str(tmp_path / "d"), "--model", "tiny-org/dinov3-vit-gated",
                    HF_ENDPOINT=endpoint, HF_TOKEN=GRANTED)
        assert r.returncode == 0, r.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
    assert proc.returncode == 0
