"""ModelScope end to end: the real CLI (a subprocess) against the ModelScope emulator (tests/modelscope_server.py).

Every guarantee the Hub path has, through ``--source modelscope``: cold and warm runs, resume after SIGKILL, the
old checkpoint kept on a corrupt byte, the exit codes of unknown repo / no token / unknown revision, the Range
quirks of the site and of its storage host, which token goes where, dry run, ``--json``, ``info``/``verify``,
and how the source is chosen (flag > train.dino_source > DINOV3_FETCHER_SOURCE > hf).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from checkpoints import big_vit_repo_dir, vit_repo_files
from conftest import TINY, checkpoint_tree, cli_env
from dinov3_fetcher import _job
from helpers import freeze, partial_progress, sha256
from hub_server import HubServer
from modelscope_server import ModelScopeServer

MiB = 1 << 20
MODEL = "model.safetensors"
PRIVATE = "tiny-org/dinov3-private"
MS_GRANTED, MS_NOTGRANTED = "ms-valid-granted", "ms-valid-notgranted"
HF_GRANTED = "hf_valid_granted"
PUBLISHED = ("config.json", "preprocessor_config.json", MODEL, "README.md", "LICENSE.md")
FILES = vit_repo_files()


@pytest.fixture
def ms(ms: ModelScopeServer) -> ModelScopeServer:
    ms.add_repo(TINY, FILES)
    return ms


def ms_fetch(run_cli: Any, dino_root: Path, *args: str, model: str = TINY, **env: str | None) -> Any:
    return run_cli("--dino-root", str(dino_root), "--model", model, "--source", "modelscope", *args, **env)


def assert_published(dino_root: Path, files: dict[str, bytes]) -> None:
    for name in PUBLISHED:
        assert (dino_root / name).read_bytes() == files[name], name


# ---------------------------------------------------------------- cold, warm, json

def test_cold_fetch_publishes_identical_bytes_and_records_the_source(run_cli: Any, ms: ModelScopeServer,
                                                                      hub: HubServer, dino_root: Path) -> None:
    r = ms_fetch(run_cli, dino_root, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["source"] == "modelscope" and out["revision"] == "master" and not out["cached"]
    assert out["files"][MODEL]["sha256"] == sha256(FILES[MODEL])
    assert_published(dino_root, FILES)
    manifest = json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_bytes())
    assert (manifest["source"], manifest["endpoint"], manifest["complete"]) == ("modelscope", ms.endpoint, True)
    assert {n: f["sha256"] for n, f in manifest["files"].items()} == {n: sha256(FILES[n]) for n in PUBLISHED}
    assert ms.listing_gets(TINY) and ms.bytes_served(MODEL, "storage") == len(FILES[MODEL])
    assert hub.requests == []  # the Hub was never asked


def test_warm_run_makes_no_request(run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    assert ms_fetch(run_cli, dino_root, "-q").returncode == 0
    before = checkpoint_tree(dino_root)
    ms.clear()
    r = ms_fetch(run_cli, dino_root)
    assert r.returncode == 0, r.stderr
    assert ms.requests == []
    assert "no request made" in r.stderr
    assert checkpoint_tree(dino_root) == before


def test_a_fetch_pinned_to_a_commit_is_warm_with_zero_requests_online_and_offline(
        run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    commit = ms.repos[TINY].branches["master"]
    assert ms_fetch(run_cli, dino_root, "-q", "--revision", commit).returncode == 0
    ms.clear()
    for offline in (None, "1"):
        r = ms_fetch(run_cli, dino_root, "--revision", commit, HF_HUB_OFFLINE=offline)
        assert r.returncode == 0, r.stderr
        assert "no request made" in r.stderr
    assert ms.requests == []
    info = json.loads(run_cli("info", "--dino-root", str(dino_root), "--source", "modelscope", "--model", TINY,
                              "--revision", commit, "--json").stdout)
    assert info["matches"] is True and info["site_revision"] == commit


def test_info_shows_the_sites_revision_to_pin_and_says_what_the_digest_is(run_cli: Any, ms: ModelScopeServer,
                                                                          dino_root: Path, tmp_path: Path) -> None:
    newest = ms.add_commit(TINY, {"README.md": b"# a newer card\n"})  # the newest commit changed one file only
    assert ms_fetch(run_cli, dino_root, "-q").returncode == 0
    info = json.loads(run_cli("info", "--dino-root", str(dino_root), "--json").stdout)
    assert info["site_revision"] == newest and info["commit"] != newest
    text = run_cli("info", "--dino-root", str(dino_root)).stdout
    assert f"revision:   master (modelscope commit {newest}, what --revision takes; listing digest " \
           f"{info['commit']}: this tool's id of the file list, not a revision of the site)" in text, text
    other = tmp_path / "pinned"  # what info offers to pin is a revision the site takes, with the same files
    r = ms_fetch(run_cli, other, "-q", "--revision", newest)
    assert r.returncode == 0, r.stderr
    assert checkpoint_tree(other) | {".dinov3-fetcher/manifest.json": ""} == \
        checkpoint_tree(dino_root) | {".dinov3-fetcher/manifest.json": ""}


# ---------------------------------------------------------------- resume after SIGKILL

def test_resume_after_sigkill_of_the_cli(ms: ModelScopeServer, tmp_path: Path, dino_root: Path) -> None:
    src = big_vit_repo_dir(tmp_path / "src", hidden=512, intermediate=2048, layers=3)  # ~38 MB
    files: dict[str, Path | bytes] = {p.name: p for p in src.iterdir()}
    ms.add_repo(TINY, files)
    size = (src / MODEL).stat().st_size
    ms.faults.add(path_suffix=MODEL, host="storage", throttle_bps=16 * MiB, pause_at=3 * size // 4)  # it cannot end
    cmd = [sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model", TINY,
           "--source", "modelscope", "-q"]
    env = cli_env(DINOV3_FETCHER_CONNECTIONS="4")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while ms.bytes_served(MODEL, "storage") < size // 2:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.005)
        freeze(ms.gate, ms.storage_endpoint, proc)  # what was sent was received: the kill costs what the design
        os.kill(proc.pid, signal.SIGKILL)            # bounds
        proc.communicate()
        first = ms.bytes_served(MODEL, "storage")  # while the server still holds every body back
    finally:
        ms.gate.set()
        ms.resume.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (dino_root / MODEL).exists()
    ms.clear()
    ms.faults.clear()
    r = subprocess.run([*cmd[:-1], "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    second = ms.bytes_served(MODEL, "storage")
    out = json.loads(r.stdout)
    # What a SIGKILL may cost: progress not yet recorded plus one block per connection in flight.
    bound = _job.SAVE_EVERY + 4 * (MiB + 512 * 1024)
    assert out["bytes_resumed"] > 0 and second < size - out["bytes_resumed"] + bound
    assert first + second <= size + bound, (first, second, size)
    assert all(f"bytes={0}-" not in (q.range or "") for q in ms.file_gets(MODEL, "storage"))  # nothing restarted
    assert hashlib.sha256((dino_root / MODEL).read_bytes()).hexdigest() == out["files"][MODEL]["sha256"]
    assert (dino_root / MODEL).read_bytes() == (src / MODEL).read_bytes()
    print(f"killed after {first / MiB:.1f} MiB of {size / MiB:.1f}; resumed {out['bytes_resumed'] / MiB:.1f} MiB, "
          f"second run fetched {second / MiB:.1f} MiB; wasted {(first + second - size) / MiB:.2f} MiB")


# ---------------------------------------------------------------- failures and exit codes

def test_a_corrupt_byte_exits_8_and_keeps_the_good_checkpoint(run_cli: Any, ms: ModelScopeServer,
                                                              dino_root: Path) -> None:
    assert ms_fetch(run_cli, dino_root, "-q").returncode == 0
    before = checkpoint_tree(dino_root)
    ms.add_commit(TINY, {MODEL: vit_repo_files(seed=7)[MODEL]})
    ms.faults.add(path_suffix=MODEL, host="storage", corrupt_at=1000)
    r = ms_fetch(run_cli, dino_root, "--update", "--json")
    assert r.returncode == 8, r.stderr
    err = json.loads(r.stdout)["error"]
    assert err["type"] == "IntegrityError" and MODEL in err["message"]
    assert "MODELSCOPE_ENDPOINT" in err["hint"] and "HF_ENDPOINT" not in err["hint"]
    assert checkpoint_tree(dino_root) == before  # the old checkpoint, byte for byte, manifest included


def test_unknown_repo_exits_5(run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    r = ms_fetch(run_cli, dino_root, model="tiny-org/no-such-repo")
    assert r.returncode == 5, r.stderr
    assert "tiny-org/no-such-repo" in r.stderr and "not found" in r.stderr
    assert not dino_root.exists() or not any(dino_root.glob("*.safetensors"))


def test_private_repo_without_token_exits_4_naming_the_variable(run_cli: Any, ms: ModelScopeServer,
                                                                dino_root: Path) -> None:
    ms.add_repo(PRIVATE, FILES, private=True)
    ms.grant(PRIVATE, MS_GRANTED)
    r = ms_fetch(run_cli, dino_root, model=PRIVATE, HF_TOKEN=HF_GRANTED)  # a Hub token does not help here
    assert r.returncode == 4, r.stderr
    assert "MODELSCOPE_API_TOKEN" in r.stderr and "HF_TOKEN" not in r.stderr
    r = ms_fetch(run_cli, dino_root, "-q", model=PRIVATE, MODELSCOPE_API_TOKEN=MS_NOTGRANTED)
    assert r.returncode == 4, r.stderr
    assert "MODELSCOPE_API_TOKEN" in r.stderr and MS_NOTGRANTED not in r.stderr
    r = ms_fetch(run_cli, dino_root, "-q", model=PRIVATE, MODELSCOPE_API_TOKEN=MS_GRANTED)
    assert r.returncode == 0, r.stderr
    assert_published(dino_root, FILES)


def test_a_saved_login_that_is_a_fifo_is_refused_naming_it(run_cli: Any, ms: ModelScopeServer, dino_root: Path,
                                                             tmp_path: Path) -> None:
    cookies = tmp_path / "ms_home" / "credentials" / "cookies"
    cookies.parent.mkdir(parents=True)
    os.mkfifo(cookies)
    r = ms_fetch(run_cli, dino_root, timeout=60)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == (f"dinov3-fetcher: error: ModelScope's saved login {cookies} is a FIFO (named pipe), "
                                "not a regular file -> remove it and run 'modelscope login' again, or set "
                                "MODELSCOPE_API_TOKEN (empty: anonymous); MODELSCOPE_HOME moves that folder")
    assert ms.requests == []
    r = ms_fetch(run_cli, dino_root, "-q", MODELSCOPE_API_TOKEN="", timeout=60)  # the token set: no login read
    assert r.returncode == 0, r.stderr
    assert_published(dino_root, FILES)


def test_unknown_revision_exits_6(run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    r = ms_fetch(run_cli, dino_root, "--revision", "v9.9", "--json")
    assert r.returncode == 6, r.stderr
    assert json.loads(r.stdout)["error"]["type"] == "RevisionNotFoundError"
    assert "v9.9" in r.stderr


# ---------------------------------------------------------------- the Range quirks

def test_storage_answering_a_range_with_200_and_content_range_resumes_without_restarting(
        run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    ms.range_as_200 = True
    size = len(FILES[MODEL])
    ms.faults.add(path_suffix=MODEL, host="storage", cut_after=size // 3, times=1)
    r = ms_fetch(run_cli, dino_root, "-q", DINOV3_FETCHER_CONNECTIONS="1")
    assert r.returncode == 0, r.stderr
    gets = ms.file_gets(MODEL, "storage")
    assert [g.status for g in gets] == [200, 200] and gets[1].range == f"bytes={size // 3}-{size - 1}"
    assert ms.bytes_served(MODEL, "storage") == size  # the rest only: taken as the range it says it is
    assert_published(dino_root, FILES)


def test_storage_ignoring_range_but_labelling_the_whole_body_is_taken_whole(
        run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    """A 200 whose Content-Range covers every byte is the whole file, as an unlabelled 200 is: the resume
    completes (it restreams past the bytes on disk) instead of failing on every rerun."""
    ms.label_whole_body = True
    size = len(FILES[MODEL])
    ms.faults.add(path_suffix=MODEL, host="storage", cut_after=size // 3, times=1)
    ms.faults.add(path_suffix=MODEL, host="storage", ignore_range=True)
    r = ms_fetch(run_cli, dino_root, "-q", DINOV3_FETCHER_CONNECTIONS="1", DINOV3_FETCHER_RETRIES="0")
    assert r.returncode == 10, r.stderr  # the cut: the partial is kept
    r = ms_fetch(run_cli, dino_root, "-q", DINOV3_FETCHER_CONNECTIONS="1", DINOV3_FETCHER_RETRIES="0")
    assert r.returncode == 0, r.stderr
    gets = ms.file_gets(MODEL, "storage")
    assert gets[-1].range == f"bytes={size // 3}-{size - 1}" and gets[-1].status == 200
    assert_published(dino_root, FILES)


def test_storage_refusing_the_signed_link_of_a_public_repo_is_a_network_error_naming_it(
        run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    ms.faults.add(path_suffix=MODEL, host="storage", status=403)
    r = ms_fetch(run_cli, dino_root, "--json")
    assert r.returncode == 10, r.stderr
    error = json.loads(r.stdout)["error"]
    storage = ms.storage_endpoint.removeprefix("http://")
    assert error["type"] == "NetworkError"
    assert error["message"].startswith(f"the storage host {storage} refused {MODEL} (HTTP 403"), error
    assert "private or gated" not in r.stderr and "MODELSCOPE_API_TOKEN" not in r.stderr


def test_git_stored_file_ignoring_range_is_restreamed_and_verified(run_cli: Any, ms: ModelScopeServer,
                                                                   dino_root: Path) -> None:
    name = "config.json"
    size = len(FILES[name])
    ms.faults.add(path_suffix="/" + name, host="api", cut_after=100, times=1)
    r = ms_fetch(run_cli, dino_root, "-q")
    assert r.returncode == 0, r.stderr
    gets = ms.file_gets("/" + name, "api")
    assert len(gets) == 2 and gets[1].range is not None and gets[1].range.startswith("bytes=100-")
    assert [g.status for g in gets] == [200, 200]
    assert ms.bytes_served("/" + name, "api") == 100 + size  # the whole file again: Range was ignored
    assert (dino_root / name).read_bytes() == FILES[name]
    assert ms.file_gets(name, "storage") == []  # git-stored: never redirected


# ---------------------------------------------------------------- tokens

def _headers_text(reqs: list[Any]) -> str:
    return "\n".join(f"{r.path} {json.dumps(r.headers)}" for r in reqs)


def test_each_token_goes_to_its_own_source_only(run_cli: Any, ms: ModelScopeServer, hub: HubServer,
                                                tmp_path: Path) -> None:
    hub.add_repo(TINY, FILES)
    tokens = {"HF_TOKEN": HF_GRANTED, "MODELSCOPE_API_TOKEN": MS_GRANTED}
    r = ms_fetch(run_cli, tmp_path / "a", "-q", **tokens)
    assert r.returncode == 0, r.stderr
    assert hub.requests == []
    api = [q for q in ms.requests if q.host == "api"]
    storage = [q for q in ms.requests if q.host == "storage"]
    assert api and storage
    assert HF_GRANTED not in _headers_text(ms.requests)
    assert all(q.headers.get("authorization") == f"Bearer {MS_GRANTED}" for q in api)  # the endpoint gets it
    assert MS_GRANTED not in _headers_text(storage)  # the storage host it redirects to never does
    assert all("authorization" not in q.headers and "cookie" not in q.headers for q in storage)
    ms.clear()
    r = run_cli("--dino-root", str(tmp_path / "b"), "--model", TINY, "--source", "hf", "-q", **tokens)
    assert r.returncode == 0, r.stderr
    assert ms.requests == []
    assert hub.requests and MS_GRANTED not in _headers_text(hub.requests)
    assert any(q.headers.get("authorization") == f"Bearer {HF_GRANTED}" for q in hub.requests)
    for out in (r.stdout, r.stderr):
        assert MS_GRANTED not in out and HF_GRANTED not in out


# ---------------------------------------------------------------- dry run, info, verify

def test_dry_run_writes_nothing_and_names_the_source(run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    r = ms_fetch(run_cli, dino_root, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dry_run"] and out["source"] == "modelscope" and out["revision"] == "master"
    sizes = {f["name"]: f["size"] for f in out["files"]}
    assert sizes[MODEL] == len(FILES[MODEL]) and out["bytes_to_download"] == sum(sizes.values())
    assert not dino_root.exists()
    assert ms.file_gets() == [] and len(ms.listing_gets(TINY)) == 1


def test_info_and_verify_show_the_source(run_cli: Any, ms: ModelScopeServer, dino_root: Path) -> None:
    assert ms_fetch(run_cli, dino_root, "-q").returncode == 0
    ms.clear()
    r = run_cli("info", "--dino-root", str(dino_root), "--source", "modelscope", "--model", TINY, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["source"], info["endpoint"], info["matches"]) == ("modelscope", ms.endpoint, True)
    assert info["revision"] == "master"
    r = run_cli("info", "--dino-root", str(dino_root), "--source", "modelscope", "--model", TINY)
    assert f"from modelscope ({ms.endpoint})" in r.stdout
    r = run_cli("info", "--dino-root", str(dino_root), "--source", "hf", "--model", TINY, "--revision", "master",
                "--json")
    other = json.loads(r.stdout)
    assert other["matches"] is False and other["requested"]["source"] == "hf"  # same names, another source
    r = run_cli("verify", "--dino-root", str(dino_root), "--deep", "--json")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert (v["source"], v["endpoint"]) == ("modelscope", ms.endpoint)
    r = run_cli("verify", "--dino-root", str(dino_root))
    assert r.returncode == 0 and "from modelscope" in r.stdout, r.stdout
    assert ms.requests == []  # offline


# ---------------------------------------------------------------- which source

def _requested(run_cli: Any, *args: str, **env: str | None) -> tuple[str, str]:
    """Which source and revision a request resolves to (``info`` is offline: no emulator needed)."""
    r = run_cli("info", "--json", *args, **env)
    assert r.returncode == 0, r.stderr
    req = json.loads(r.stdout)["requested"]
    return req["source"], req["revision"]


def test_source_precedence_flag_then_config_then_environment(run_cli: Any, ms: ModelScopeServer,
                                                             tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"train": {"dino_root": "dinov3", "dino_model": TINY, "dino_source": "hf"}}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"train": {"dino_root": "dinov3", "dino_model": TINY}}))
    env_ms = {"DINOV3_FETCHER_SOURCE": "modelscope"}
    assert _requested(run_cli, "--config", str(plain)) == ("hf", "main")  # the default
    assert _requested(run_cli, "--config", str(plain), **env_ms) == ("modelscope", "master")
    assert _requested(run_cli, "--config", str(cfg), **env_ms) == ("hf", "main")  # config beats environment
    assert _requested(run_cli, "--config", str(cfg), "--source", "modelscope") == ("modelscope", "master")
    assert _requested(run_cli, "--config", str(plain), "--source", "hf", **env_ms) == ("hf", "main")
    # the fetch itself goes where the request says: here the environment's choice, ModelScope
    r = run_cli("fetch", "--dry-run", "--json", "--config", str(plain), **env_ms)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"] == "modelscope" and len(ms.listing_gets(TINY)) == 1
    r = run_cli("fetch", "--dry-run", "--config", str(plain), DINOV3_FETCHER_SOURCE="gitee")
    assert r.returncode == 3 and "DINOV3_FETCHER_SOURCE" in r.stderr


# ---------------------------------------------------------------- switching source

def test_switching_source_reuses_files_with_the_same_sha256(run_cli: Any, ms: ModelScopeServer, hub: HubServer,
                                                            dino_root: Path) -> None:
    hub.add_repo(TINY, FILES)
    hf = ("--dino-root", str(dino_root), "--model", TINY, "-q")
    assert run_cli(*hf, "--source", "hf").returncode == 0
    total = sum(len(FILES[n]) for n in PUBLISHED)
    assert hub.bytes_served() >= total
    # Hub -> ModelScope: the listing only; not one byte of a file
    hub.clear()
    r = ms_fetch(run_cli, dino_root, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["bytes_fetched"], out["requests_made"]) == (0, True)
    assert ms.file_gets() == [] and len(ms.listing_gets(TINY)) == 1 and hub.requests == []
    manifest = json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_bytes())
    assert (manifest["source"], manifest["endpoint"], manifest["revision"]) == ("modelscope", ms.endpoint, "master")
    assert_published(dino_root, FILES)
    # ModelScope -> Hub again: no file bytes from the Hub either
    ms.clear()
    r = run_cli(*hf, "--source", "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_fetched"] == 0
    assert hub.bytes_served() == 0 and ms.requests == []
    assert json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_bytes())["source"] == "hf"


def test_modelscope_first_then_the_hub_reuses_by_git_id_and_fetches_only_what_differs(
        run_cli: Any, ms: ModelScopeServer, hub: HubServer, dino_root: Path) -> None:
    changed = dict(FILES, **{MODEL: vit_repo_files(seed=3)[MODEL]})  # the Hub holds other weights
    hub.add_repo(TINY, changed)
    assert ms_fetch(run_cli, dino_root, "-q").returncode == 0
    assert ms.bytes_served(MODEL, "storage") == len(FILES[MODEL])
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, "--source", "hf", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes_fetched"] == len(changed[MODEL])
    assert hub.bytes_served() == len(changed[MODEL])  # config, preprocessor, README, LICENSE reused
    assert_published(dino_root, changed)


def test_a_download_killed_on_the_hub_resumes_from_modelscope(ms: ModelScopeServer, hub: HubServer,
                                                              tmp_path: Path, dino_root: Path) -> None:
    """The partial data is named by the file's sha256, which both sources list: switching source resumes it."""
    src = big_vit_repo_dir(tmp_path / "src", hidden=512, intermediate=2048, layers=3)  # ~38 MB
    files: dict[str, Path | bytes] = {p.name: p for p in src.iterdir()}
    hub.add_repo(TINY, files)
    ms.add_repo(TINY, files)
    size = (src / MODEL).stat().st_size
    hub.faults.add(path_suffix=MODEL, host="cdn", throttle_bps=16 * MiB, pause_at=3 * size // 4)  # it cannot end
    cmd = [sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(dino_root), "--model", TINY, "-q"]
    env = cli_env(DINOV3_FETCHER_CONNECTIONS="4")
    proc = subprocess.Popen([*cmd, "--source", "hf"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while sum(partial_progress(dino_root).values()) < size // 2:  # recorded: past the head start (not kept
            assert proc.poll() is None, proc.communicate()           # unless the listing confirmed it)
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
    finally:
        hub.resume.set()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    r = subprocess.run([*cmd, "--source", "modelscope", "--json"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["bytes_resumed"] >= size // 4
    assert ms.bytes_served(MODEL, "storage") <= size - out["bytes_resumed"] + _job.SAVE_EVERY
    assert (dino_root / MODEL).read_bytes() == (src / MODEL).read_bytes()
