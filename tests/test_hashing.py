"""Hashing from the page cache (hashing.py): the digest of any byte range, never a crash on a short file, and
a partial download whose data file is shorter than its progress record is not resumed but fetched again."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from checkpoints import vit_repo_files
from conftest import TINY
from dinov3_fetcher import fetch_dinov3
from dinov3_fetcher._errors import NetworkError
from dinov3_fetcher._hashing import WINDOW, hash_range, read_range
from hub_server import HubServer

MODEL = "model.safetensors"


@pytest.mark.parametrize(("start", "end"), [(0, 0), (0, 1), (4095, 4097), (1, WINDOW + 12345), (0, 3 * WINDOW + 7),
                                            (WINDOW - 1, 2 * WINDOW + 1)])
def test_hash_range_gives_hashlibs_digest(tmp_path: Path, start: int, end: int) -> None:
    data = os.urandom(3 * WINDOW + 7)
    p = tmp_path / "f"
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        seen: list[int] = []
        for name, hash_it in (("hash_range", lambda hs: hash_range(fd, start, end, hs)),
                              ("read_range", lambda hs: read_range(fd, start, end, hs, seen.append))):
            sha, sha1 = hashlib.sha256(), hashlib.sha1()
            assert hash_it([sha, sha1]) == end
            assert sha.hexdigest() == hashlib.sha256(data[start:end]).hexdigest(), name
            assert sha1.hexdigest() == hashlib.sha1(data[start:end]).hexdigest(), name
        assert sum(seen) == end - start
    finally:
        os.close(fd)


def test_hash_range_stops_where_a_short_file_ends(tmp_path: Path) -> None:
    p = tmp_path / "short"
    p.write_bytes(b"x" * 10_000)
    fd = os.open(p, os.O_RDONLY)
    try:
        sha = hashlib.sha256()
        assert hash_range(fd, 0, 2 * WINDOW, [sha]) == 10_000  # not SIGBUS past the end of the file
        assert sha.hexdigest() == hashlib.sha256(b"x" * 10_000).hexdigest()
        assert hash_range(fd, 20_000, 30_000, [hashlib.sha256()]) == 20_000
    finally:
        os.close(fd)


def test_a_truncated_partial_is_started_over_not_trusted(hub: HubServer, dino_root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A partial whose data file is shorter than its progress record says: not resumed, fetched again, right."""
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, files)
    size = len(files[MODEL])
    hub.faults.add(cut_after=size // 2, path_suffix=MODEL, host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    monkeypatch.setenv("DINOV3_FETCHER_CONNECTIONS", "1")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    (folder,) = list((dino_root / ".dinov3-fetcher" / "partial").iterdir())
    progress = json.loads((folder / "progress.json").read_bytes())
    assert size - sum(e - s for s, e in progress["remaining"]) > 4096
    os.truncate(folder / "data", 4096)  # the record now claims bytes the file does not hold
    monkeypatch.delenv("DINOV3_FETCHER_RETRIES")
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / MODEL).read_bytes() == files[MODEL]
    assert hub.bytes_served(MODEL) == size  # started over: the record was not trusted


def test_a_partial_with_adjacent_missing_ranges_resumes_instead_of_starting_over(hub: HubServer,
                                                                                 dino_root: Path) -> None:
    """What a kill mid-piece leaves: [3 MiB, 8 MiB) and [8 MiB, end) missing, the data file 3 MiB long."""
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, files)
    data, size, mib = files[MODEL], len(files[MODEL]), 1 << 20
    sha = hashlib.sha256(data).hexdigest()
    folder = dino_root / ".dinov3-fetcher" / "partial" / sha
    folder.mkdir(parents=True)
    assert size > 8 * mib
    (folder / "data").write_bytes(data[:3 * mib])
    remaining = [[3 * mib, 8 * mib], [8 * mib, size]]
    (folder / "progress.json").write_text(json.dumps({"identity": sha, "size": size, "remaining": remaining}))
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / MODEL).read_bytes() == data
    assert hub.bytes_served(MODEL) == size - 3 * mib  # resumed: not started over
