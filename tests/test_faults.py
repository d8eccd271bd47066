"""A misbehaving server, for real: the emulator cuts, resets, stalls, throttles, answers 429/5xx, ignores
Range, drops Content-Length, chunks, corrupts bytes, redirects LFS downloads to another host or to nowhere,
holds back or fails the metadata request and lists sizes its files do not have. Every test runs the real CLI
in a subprocess and asserts what a user would see: exit code, message, bytes on disk, and the requests and
bytes the server saw.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import threading
import types
from pathlib import Path
from typing import Any

import pytest

from checkpoints import vit_repo_files
from conftest import TINY, checkpoint_tree
from helpers import error_line, partial_progress, sha256
from hub_server import HubServer, Request

MiB = 1 << 20
MODEL = "model.safetensors"


def small_files(seed: int = 0) -> dict[str, bytes]:
    """A ~12.6 MB ViT checkpoint: big enough for several 1 MiB blocks, small enough for one connection."""
    return vit_repo_files(seed=seed, hidden=256, intermediate=1024, layers=4)


def model_gets(hub: HubServer) -> list[Request]:
    """GETs that carried model.safetensors bytes (CDN answers; the hub's 302 carries none)."""
    return [r for r in hub.file_gets(MODEL) if r.host == "cdn"]


def fetch_json(run_cli: Any, dino_root: Path, *extra: str, **env: str) -> tuple[subprocess.CompletedProcess[str],
                                                                              dict[str, Any]]:
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, "--json", *extra, **env)
    return proc, json.loads(proc.stdout)


def fetched_total(files: dict[str, bytes]) -> int:
    """Bytes a cold fetch downloads: config, preprocessor, weights, README, LICENSE (not model.pth etc.)."""
    return sum(len(files[n]) for n in ("config.json", "preprocessor_config.json", MODEL, "README.md", "LICENSE.md"))


def assert_checkpoint(dino_root: Path, files: dict[str, bytes]) -> None:
    for name in ("config.json", "preprocessor_config.json", MODEL):
        assert sha256((dino_root / name).read_bytes()) == sha256(files[name]), name


@pytest.fixture
def repo(hub: HubServer) -> dict[str, bytes]:
    files = small_files()
    hub.add_repo(TINY, files)
    return files


# -- connection faults mid-body ------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True], ids=["clean-close", "reset"])
def test_cut_mid_body_resumes_from_written_bytes(hub: HubServer, repo: dict[str, bytes], run_cli: Any,
                                                 dino_root: Path, reset: bool) -> None:
    size = len(repo[MODEL])
    cut = 3 * MiB + 123
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=cut, reset=reset)
    proc, out = fetch_json(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert len(gets) == 2 and gets[0].range is None
    # a retry from byte 0 is a plain GET (no Range): only possible after an RST dropped everything unread
    start = int(gets[1].range.removeprefix("bytes=").split("-")[0]) if gets[1].range else 0
    if reset:  # an RST may drop what sat unread in our socket buffer; never more than was sent
        assert 0 <= start <= cut
    else:  # a clean close: every byte received was kept
        assert start == cut
    assert gets[1].body_bytes == size - start
    assert hub.bytes_served(MODEL) <= size + (cut - start)
    assert out["bytes_fetched"] == fetched_total(repo) and out["files"][MODEL]["sha256"] == sha256(repo[MODEL])


def test_stall_longer_than_read_timeout_reconnects_and_resumes(hub: HubServer, repo: dict[str, bytes],
                                                                run_cli: Any, dino_root: Path) -> None:
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, pause_at=2 * MiB)  # silent until the test ends
    proc, _ = fetch_json(run_cli, dino_root, DINOV3_FETCHER_TIMEOUT="1")
    assert not hub.resume.is_set()  # done while the first body is still held: the read gave up on its own
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert [g.range for g in gets] == [None, f"bytes={2 * MiB}-{size - 1}"]
    assert gets[1].t - gets[0].t > 0.9  # after the timeout's second of silence, not before
    assert gets[1].body_bytes == size - 2 * MiB


_SLOW = pytest.mark.slow


@pytest.mark.parametrize(("status", "retry_after"), [
    pytest.param(429, None, marks=_SLOW), pytest.param(500, None, marks=_SLOW), (502, None), (503, None),
    (429, "1"), pytest.param(503, "1", marks=_SLOW),
])
def test_http_error_mid_download_retries_with_backoff_and_resumes(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path, status: int,
        retry_after: str | None) -> None:
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=2 * MiB)
    hub.faults.add(path_suffix=MODEL, host="cdn", after=1, times=2, status=status, retry_after=retry_after)
    proc, out = fetch_json(run_cli, dino_root, DINOV3_FETCHER_BACKOFF="0.2", DINOV3_FETCHER_RETRIES="3")
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert [g.status for g in gets] == [200, status, status, 206]
    assert all(g.range == f"bytes={2 * MiB}-{size - 1}" for g in gets[1:])  # resumed from the bytes written
    assert hub.bytes_served(MODEL) == size  # nothing fetched twice
    waits = [b.t - a.t for a, b in itertools.pairwise(gets[1:])]
    if retry_after:  # the server's Retry-After wins over our backoff
        assert all(w >= 0.95 for w in waits), waits
    else:  # exponential backoff: 0.2 s, then 0.4 s (test_retry_waits_the_backoff_doubled_or_the_retry_after)
        assert waits[0] > 0.15 and waits[1] > 0.35, waits
    assert out["bytes_fetched"] == fetched_total(repo)


def test_retry_waits_the_backoff_doubled_or_the_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    from dinov3_fetcher import _retry

    slept: list[float] = []
    monkeypatch.setattr(_retry, "time", types.SimpleNamespace(sleep=slept.append))  # its clock, not the process's
    tries = _retry.RetryPolicy(retries=6, backoff=0.2).tries()
    assert all(tries.failed() for _ in range(5))
    assert tries.failed(wait=7.0)  # a Retry-After replaces the backoff of that try
    assert not tries.failed()  # the seventh failure in a row: no more tries
    assert slept == [0.2, 0.4, 0.8, 1.6, 1.6, 7.0]  # doubled per try, up to 8x the backoff


@pytest.mark.parametrize(("status", "gets"), [(503, 2), (401, 1)])
def test_an_error_raised_deep_in_a_transfer_reaches_the_caller_as_it_was_raised(
        hub: HubServer, repo: dict[str, bytes], dino_root: Path, monkeypatch: pytest.MonkeyPatch, status: int,
        gets: int) -> None:
    # The package's errors are also stdlib types (a NetworkError is an OSError): no handler on the way out may take
    # one for a disk error, retry it or wrap it. 503: the retries run out; 401: the storage host refuses, final.
    from dinov3_fetcher import NetworkError, fetch_dinov3

    hub.faults.add(path_suffix=MODEL, host="cdn", status=status)  # every try of the weights' bytes
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "1")
    with pytest.raises(OSError) as info:  # as documented, ``except OSError`` catches it
        fetch_dinov3(dino_root, TINY)
    exc = info.value
    assert type(exc) is NetworkError
    hub_host, cdn_host = (e.split("://", 1)[1] for e in (hub.endpoint, hub.cdn_endpoint))
    if status == 503:
        assert exc.message == f"downloading {MODEL} from {hub_host} failed 2 times in a row (HTTP 503)"
    else:
        assert exc.message.startswith(f"the storage host {cdn_host} refused {MODEL} (HTTP 401"), exc.message
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append((Path(tb.tb_frame.f_code.co_filename).name, tb.tb_frame.f_code.co_name))
        tb = tb.tb_next
    assert ("_job.py", "fetch_segment") in frames  # the very object raised while the weights' bytes were fetched
    assert [g.status for g in model_gets(hub)] == [status] * gets  # a final answer is not retried
    assert not (dino_root / MODEL).exists()


def test_retries_exhausted_one_line_error_keeps_partial_then_next_run_fetches_only_the_rest(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path) -> None:
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=5 * MiB)
    hub.faults.add(path_suffix=MODEL, host="cdn", after=1, status=503)  # forever
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_RETRIES="2")
    assert proc.returncode == 10, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dinov3-fetcher: error: ") and "503" in lines[0]
    assert "run the same command again" in lines[0] and "resumes" in lines[0]
    assert [g.status for g in model_gets(hub)] == [200, 503, 503]  # the cut, then 2 retries without progress
    kept = partial_progress(dino_root)
    weights = hashlib.sha256(repo[MODEL]).hexdigest()
    # the weights' partial data is kept, and says how much it holds (README and LICENSE, fetched beside them,
    # may have been cut by the error too)
    assert [v for k, v in kept.items() if k.startswith(weights)] == [5 * MiB], kept
    assert not (dino_root / MODEL).exists()

    hub.faults.clear()
    hub.clear()
    proc, out = fetch_json(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    assert hub.bytes_served(MODEL) == size - 5 * MiB  # only the rest
    assert [g.range for g in model_gets(hub)] == [f"bytes={5 * MiB}-{size - 1}"]
    assert out["bytes_resumed"] == 5 * MiB
    assert partial_progress(dino_root) == {}


# -- mirrors ---------------------------------------------------------------------------------------------------


def _partial_first_run(hub: HubServer, run_cli: Any, dino_root: Path, cut: int) -> None:
    """Leave ``cut`` bytes of model.safetensors on disk, as a run that lost its link would."""
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=cut)
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_RETRIES="0")
    assert proc.returncode == 10, proc.stderr
    assert list(partial_progress(dino_root).values()) == [cut]
    hub.faults.clear()
    hub.clear()


def test_mirror_ignoring_range_restreams_whole_file(hub: HubServer, repo: dict[str, bytes], run_cli: Any,
                                                    dino_root: Path) -> None:
    size = len(repo[MODEL])
    _partial_first_run(hub, run_cli, dino_root, 4 * MiB)
    hub.faults.add(path_suffix=MODEL, ignore_range=True)
    proc, _ = fetch_json(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert gets[0].range is not None and gets[0].status == 200  # asked to resume, got the whole file
    assert hub.bytes_served(MODEL) == size


def test_mirror_ignoring_range_cannot_splice_bad_bytes_into_the_prefix(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path) -> None:
    """The whole-file answer differs from the first run's bytes inside the prefix already on disk (and
    already hashed): the published file must still be exactly the Hub's."""
    _partial_first_run(hub, run_cli, dino_root, 6 * MiB)
    hub.faults.add(path_suffix=MODEL, ignore_range=True, corrupt_at=1 * MiB + 7)
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert proc.returncode == 0, proc.stderr  # the corrupt byte lies in the prefix on disk: read past, not written
    assert_checkpoint(dino_root, repo)
    verify = run_cli("verify", "--dino-root", str(dino_root), "--deep")
    assert verify.returncode == 0, verify.stderr


def test_mirror_ignoring_range_on_a_multi_connection_file(hub: HubServer, run_cli: Any, dino_root: Path) -> None:
    files = vit_repo_files(hidden=512, intermediate=2048, layers=3)  # ~38 MB: two 16 MiB+ connections
    size = len(files[MODEL])
    assert size >= 32 * MiB
    hub.add_repo(TINY, files)
    hub.faults.add(path_suffix=MODEL, ignore_range=True)
    proc, _ = fetch_json(run_cli, dino_root, DINOV3_FETCHER_CONNECTIONS="4")
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, files)
    assert size <= hub.bytes_served(MODEL) <= 2 * size  # the second connection's whole-file answer won


@pytest.mark.parametrize("knob", ["no_content_length", "chunked"])
def test_mirror_without_content_length_or_chunked_including_a_resume(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path, knob: str) -> None:
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=3 * MiB)
    hub.faults.add(path_suffix=MODEL, host="cdn", **{knob: True})
    proc, _ = fetch_json(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert [g.range for g in gets] == [None, f"bytes={3 * MiB}-{size - 1}"]
    assert hub.bytes_served(MODEL) == size


def test_mirror_sending_a_truncated_body_without_content_length_is_not_accepted(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path) -> None:
    """Without Content-Length a clean close looks like the end of the body: the size from the Hub decides."""
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=3 * MiB, no_content_length=True)
    proc, _ = fetch_json(run_cli, dino_root)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    assert hub.bytes_served(MODEL) == size


# -- corrupt bytes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "offset"), [(MODEL, 5 * MiB + 3),
                                              pytest.param("preprocessor_config.json", 10, marks=_SLOW)])
def test_corrupt_bytes_are_refused_and_discarded_and_the_good_checkpoint_stays(
        hub: HubServer, repo: dict[str, bytes], run_cli: Any, dino_root: Path, name: str, offset: int) -> None:
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert proc.returncode == 0, proc.stderr
    before = checkpoint_tree(dino_root)
    v2 = small_files(seed=1)
    v2["preprocessor_config.json"] = v2["preprocessor_config.json"].replace(b"224", b"256")
    hub.add_commit(TINY, v2)
    hub.faults.add(path_suffix=name, corrupt_at=offset)  # a corrupt mirror: every answer is bad
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, "--update")
    assert proc.returncode == 8, proc.stderr
    assert "discarded" in proc.stderr and ("sha256" in proc.stderr or "git blob id" in proc.stderr)
    assert checkpoint_tree(dino_root) == before  # byte for byte, manifest included
    # The bad bytes were not kept to be resumed. When the preprocessor is the bad file, the new weights
    # (fetched by the head start meanwhile, whole or in part) may be kept for the next run to resume.
    good_weights = hashlib.sha256(v2[MODEL]).hexdigest()
    kept = partial_progress(dino_root)
    assert set(kept) <= ({good_weights} if name != MODEL else set()), kept

    hub.faults.clear()
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, "--update")
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, v2)


# -- LFS redirect to another host --------------------------------------------------------------------------------


def test_lfs_redirect_never_sends_the_token_to_the_cdn(hub: HubServer, run_cli: Any, dino_root: Path) -> None:
    files = small_files()
    hub.add_repo(TINY, files, gated=True)
    hub.grant(TINY, "hf_valid_granted")
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=MiB)  # a retry goes to the CDN too
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, HF_TOKEN="hf_valid_granted")
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, files)
    cdn = [r for r in hub.requests if r.host == "cdn"]
    assert len(cdn) >= 2
    assert all("authorization" not in r.headers for r in cdn)
    assert not any("hf_valid_granted" in json.dumps(r.headers) + r.path for r in cdn)
    hub_resolves = [r for r in hub.file_gets() if r.host == "hub"]
    assert hub_resolves and all(r.headers.get("authorization") == "Bearer hf_valid_granted" for r in hub_resolves)


# -- the CDN cannot be reached; a restream of a Range-ignoring mirror is cut ----------------------------------


def test_cdn_refusing_connections_is_retried_then_a_network_error(hub: HubServer, repo: dict[str, bytes],
                                                                   run_cli: Any, dino_root: Path) -> None:
    cdn = hub._servers[1]
    cdn.shutdown()
    cdn.server_close()  # the LFS redirect now points at a port where nothing listens
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_RETRIES="2")
    assert proc.returncode == 10, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "ConnectionRefusedError" in lines[0] and "failed 3 times in a row" in lines[0]
    assert "127.0.0.2" in lines[0] and "resumes" in lines[0]


def test_a_cut_during_the_restream_of_a_range_ignoring_mirror_is_retried(hub: HubServer, repo: dict[str, bytes],
                                                                         run_cli: Any, dino_root: Path) -> None:
    size = len(repo[MODEL])
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, cut_after=3 * MiB)
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_RETRIES="0")
    assert proc.returncode == 10, proc.stderr  # 3 MiB kept for the next run
    hub.faults.clear()
    hub.clear()
    hub.faults.add(path_suffix=MODEL, host="cdn", ignore_range=True)
    hub.faults.add(path_suffix=MODEL, host="cdn", times=2, cut_after=6 * MiB)  # the restream is cut, twice
    proc = run_cli("--dino-root", str(dino_root), "--model", TINY, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert_checkpoint(dino_root, repo)
    gets = model_gets(hub)
    assert len(gets) == 3  # two cut restreams and the one that completed: no request storm
    assert all(g.status == 200 for g in gets)
    assert sum(g.body_bytes for g in gets) == 6 * MiB + 6 * MiB + size


# -- the metadata request: held back, failing, lying about a size ----------------------------------------------


def test_a_metadata_request_that_never_answers_is_bounded_by_the_timeout(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    release = threading.Event()
    hub.model_info_hook = lambda: release.wait(600)  # held back until the test ends
    try:
        r = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_TIMEOUT="1",
                    DINOV3_FETCHER_RETRIES="1")
    finally:
        release.set()
    assert r.returncode == 10, r.stderr
    assert "127.0.0.1" in error_line(r.stderr)


@pytest.mark.parametrize("fault", ["429-retry-after", "503", "connection-reset"])
def test_a_failed_metadata_request_is_retried_like_the_bytes(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, fault: str) -> None:
    answers: list[Any] = [{"429-retry-after": (429, {"Retry-After": "1"}), "503": (503, {}),
                           "connection-reset": "reset"}[fault]]
    hub.model_info_hook = lambda: answers.pop() if answers else None
    r = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert r.returncode == 0, r.stderr
    assert not answers
    assert (dino_root / MODEL).read_bytes() == tiny[MODEL]


def test_a_listing_bigger_than_the_file_is_an_integrity_error_every_time(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    hub.listed_sizes[f"{TINY}/{MODEL}"] = len(tiny[MODEL]) + 1000
    for _ in range(2):
        r = run_cli("--dino-root", str(dino_root), "--model", TINY)
        assert r.returncode == 8, r.stderr
        assert MODEL in error_line(r.stderr)
    assert not (dino_root / MODEL).exists()


# -- redirects the client cannot follow, a Retry-After that is not a number -----------------------------------
# A redirect the client cannot follow is an unsafe answer from the server: the IntegrityError family (exit 8).


@pytest.mark.parametrize("location", ["ftp://127.0.0.2/lfs/x?X-Amz-Signature=s", "http://[::1/lfs/x",
                                      "http://127.0.0.2:99999/lfs/x"])
def test_a_redirect_to_a_bad_location_is_named_without_its_signature(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any, location: str) -> None:
    hub.redirect_location = lambda _: location
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, DINOV3_FETCHER_RETRIES="1")
    assert r.returncode == 8, r.stderr
    line = error_line(r.stderr)
    assert "redirect" in line and "X-Amz-Signature" not in line
    assert not (dino_root / MODEL).exists()


def test_a_retry_after_that_is_not_a_number_is_retried(
        hub: HubServer, tiny: dict[str, bytes], dino_root: Path, run_cli: Any) -> None:
    hub.faults.add(path_suffix=MODEL, host="cdn", times=1, status=503, retry_after="nan")
    r = run_cli("--dino-root", str(dino_root), "--model", TINY)
    assert r.returncode == 0, r.stderr
    cdn = [g.status for g in hub.file_gets(MODEL) if g.host == "cdn"]
    assert cdn[:1] == [503] and 200 in cdn[1:], cdn  # the CDN's 503, then the retry (after the backoff)
