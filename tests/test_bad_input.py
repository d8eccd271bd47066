"""Bad input, as a table: each case runs the real CLI in a subprocess against a dino_root that already holds a
good checkpoint, and asserts the message, the exit code, that nothing outside dino_root was written, and
that the good checkpoint is unchanged. Cases: unusable configs, bad model ids and revisions, and a hostile
Hub (file names with '..', absolute paths or backslashes in listings and index files; safetensors headers
that lie; a listing that claims a petabyte).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from checkpoints import GITATTRIBUTES, PREPROCESSOR_CONFIG, vit_config, vit_repo_files
from conftest import TINY, checkpoint_tree
from helpers import error_line
from hub_server import HubServer

MODEL = "model.safetensors"
INDEX = "model.safetensors.index.json"
GOOD_FILES = ("config.json", "preprocessor_config.json", MODEL, "README.md", "LICENSE.md")


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _st(header: bytes, data: bytes = b"", claimed: int | None = None) -> bytes:
    """A safetensors file: 8-byte header length (or a lie), header, data."""
    return struct.pack("<Q", len(header) if claimed is None else claimed) + header + data


def _tensor_header(spans: list[tuple[int, int]]) -> bytes:
    return _json({f"t{i}": {"dtype": "U8", "shape": [e - b], "data_offsets": [b, e]} for i, (b, e) in
                  enumerate(spans)})


def _hostile_repo(**files: bytes) -> dict[str, bytes]:
    """A repo whose config is a fine DINOv3 ViT; ``files`` add or replace the rest."""
    base = {"config.json": _json(vit_config()), "preprocessor_config.json": _json(PREPROCESSOR_CONFIG),
            ".gitattributes": GITATTRIBUTES}
    base.update(files)
    return base


def _index(*shards: str) -> bytes:
    return _json({"metadata": {"total_size": 8}, "weight_map": {f"w{i}": s for i, s in enumerate(shards)}})


SHARD = _st(_tensor_header([(0, 8)]), b"\0" * 8)

# repo id -> files: served by one emulator for the whole module.
HOSTILE: dict[str, dict[str, bytes]] = {
    "evil/not-dinov3": _hostile_repo(**{"config.json": _json({"model_type": "bert", "hidden_size": 8}),
                                        MODEL: SHARD}),
    "evil/index-dotdot": _hostile_repo(**{INDEX: _index("../evil.safetensors"), "../evil.safetensors": SHARD}),
    "evil/index-absolute": _hostile_repo(**{INDEX: _index("/tmp/evil.safetensors")}),
    "evil/index-backslash": _hostile_repo(**{INDEX: _index("..\\..\\evil.safetensors"),
                                             "..\\..\\evil.safetensors": SHARD}),
    "evil/index-subfolder": _hostile_repo(**{INDEX: _index("sub/../../evil.safetensors")}),
    "evil/index-shard-not-in-repo": _hostile_repo(**{INDEX: _index("model-00009-of-00009.safetensors")}),
    "evil/index-not-json": _hostile_repo(**{INDEX: b"{\"weight_map\": "}),
    "evil/index-no-weight-map": _hostile_repo(**{INDEX: _json({"weight_map": []})}),
    "evil/config-not-json": _hostile_repo(**{"config.json": b"<html>mirror error page</html>", MODEL: SHARD}),
    "evil/header-longer-than-file": _hostile_repo(**{MODEL: _st(b'{"a":', claimed=4096)}),
    "evil/header-gigantic": _hostile_repo(**{MODEL: _st(b"{}", claimed=1 << 62)}),
    "evil/header-not-json": _hostile_repo(**{MODEL: _st(b"\xff\xfenot json at all", b"\0" * 8)}),
    "evil/header-offsets-overlap": _hostile_repo(**{MODEL: _st(_tensor_header([(0, 8), (4, 12)]), b"\0" * 12)}),
    "evil/header-offsets-past-end": _hostile_repo(**{MODEL: _st(_tensor_header([(0, 8), (8, 4096)]), b"\0" * 16)}),
    "evil/listing-claims-a-petabyte": _hostile_repo(**{MODEL: SHARD}),
}
# A listing full of hostile names that the checkpoint does not use: fetched fine, nothing written for them.
HOSTILE_LISTING = {**vit_repo_files(), "../../outside.txt": b"x", "/etc/evil.json": b"{}",
                   "a\\..\\..\\b.json": b"{}", "sub/../../up.safetensors": SHARD}


@dataclass
class Ctx:
    tmp: Path
    dino_root: Path
    hub: HubServer
    cfg: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cfg = self.tmp / "config.json"

    def config(self, obj: object) -> list[str]:
        self.cfg.write_bytes(obj if isinstance(obj, bytes) else _json(obj))
        return ["--config", str(self.cfg)]

    def root_args(self, *more: str) -> list[str]:
        return ["--dino-root", str(self.dino_root), *more]


def _readonly_root(c: Ctx) -> list[str]:
    ro = c.tmp / "readonly"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.strip()}")
    return c.config({"train": {"dino_root": str(ro / "dinov3")}})


def _fifo_config(c: Ctx) -> list[str]:
    os.mkfifo(c.cfg)
    return ["--config", str(c.cfg)]


def _looping_root(c: Ctx) -> list[str]:
    (c.tmp / "loop").symlink_to("loop")
    return c.config({"train": {"dino_root": "loop/dinov3"}})


def _file_root(c: Ctx) -> list[str]:
    (c.tmp / "afile").write_text("not a folder")
    return c.config({"train": {"dino_root": "afile"}})


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[Ctx], list[str]]
    code: int
    message: str
    fetched_ok: bool = False  # a success that (re)publishes: the manifest may change, the files may not


CASES: list[Case] = [
    # -- the pipeline config -----------------------------------------------------------------------------------
    Case("config-missing", lambda c: ["--config", str(c.tmp / "nope.json")], 3, "nope.json does not exist"),
    Case("config-is-a-folder", lambda c: ["--config", str(c.tmp)], 3, "is a folder, not a file"),
    Case("config-invalid-json", lambda c: c.config(b'{"train": {dino_root: 1'), 3, "is not valid JSON (line 1"),
    Case("config-not-an-object", lambda c: c.config([1, 2]), 3, "holds a JSON list, not an object"),
    Case("config-no-train", lambda c: c.config({"paths": {"dataset_root": "d"}}), 3, 'has no "train" section'),
    Case("config-train-not-object", lambda c: c.config({"train": "dinov3"}), 3, '"train" in'),
    Case("dino-root-missing", lambda c: c.config({"train": {}}), 3, "train.dino_root is missing"),
    Case("dino-root-empty", lambda c: c.config({"train": {"dino_root": "  "}}), 3, "train.dino_root in"),
    Case("dino-root-not-a-string", lambda c: c.config({"train": {"dino_root": 42}}), 3, "must be a string, got int"),
    Case("dino-root-is-a-file", _file_root, 3, "is a file, not a folder"),
    Case("config-is-a-fifo", _fifo_config, 3, "is a FIFO (named pipe), not a regular file"),
    Case("config-nested-too-deeply", lambda c: c.config(b"[" * 200_000), 3, "is nested too deeply"),
    Case("config-5000-digit-integer", lambda c: c.config(b'{"train": {"dino_root": "work/dinov3", "seed": ' +
                                                          b"7" * 5000 + b"}}"), 3, "holds a number too long"),
    Case("dino-root-nul", lambda c: c.config({"train": {"dino_root": "t\u0000x"}}), 3, "holds a NUL character"),
    Case("dino-root-link-loop", _looping_root, 3, "goes through a loop of symbolic links"),
    Case("dino-root-name-over-255-bytes", lambda c: c.config({"train": {"dino_root": "d" * 256}}), 3,
         "has a name longer than 255 bytes"),
    Case("dino-root-over-path-max", lambda c: c.config({"train": {"dino_root": "/".join(["d" * 250] * 20)}}), 3,
         "its path is longer than the system allows"),
    Case("dino-root-unwritable", _readonly_root, 3, "cannot write in"),
    Case("dino-root-under-proc", lambda c: c.config({"train": {"dino_root": "/proc/self/dinov3"}}), 3,
         "cannot use /proc/self/dinov3 as dino_root: a folder on its path does not exist and cannot be created "
         "there"),
    Case("dino-root-in-a-file-of-proc", lambda c: c.config({"train": {"dino_root": "/proc/self/environ/dinov3"}}), 3,
         "a folder on its path is a file"),
    Case("dino-model-not-a-string", lambda c: c.config({"train": {"dino_root": "work/dinov3", "dino_model": 7}}),
         3, "train.dino_model"),
    Case("unknown-keys-tolerated", lambda c: c.config({"train": {"dino_root": "work/dinov3", "epochs": 3,
                                                                 "dino_model": TINY,
                                                                 "dino_teacher": {"x": 1}}, "extra": [1]}),
         0, "already in"),
    # -- model and revision --------------------------------------------------------------------------------------
    Case("model-empty", lambda c: c.root_args("--model", ""), 3, "the model id is empty"),
    Case("model-malformed", lambda c: c.root_args("--model", "not a repo id"), 3, "is not a Hub repo id"),
    Case("model-three-parts", lambda c: c.root_args("--model", "a/b/c"), 3, "is not a Hub repo id"),
    Case("model-dotdot", lambda c: c.root_args("--model", "../../etc"), 3, "is not a Hub repo id"),
    Case("model-not-found", lambda c: c.root_args("--model", "nobody/nothing"), 5, "was not found"),
    Case("model-not-dinov3", lambda c: c.root_args("--model", "evil/not-dinov3"), 7, "model_type is 'bert'"),
    Case("revision-missing", lambda c: c.root_args("--model", TINY, "--revision", "v9.9"), 6,
         "revision 'v9.9' does not exist"),
    Case("revision-malformed", lambda c: c.root_args("--model", TINY, "--revision", "a\\b"), 3, "is not a revision"),
    # -- a hostile Hub -----------------------------------------------------------------------------------------------
    Case("index-dotdot", lambda c: c.root_args("--model", "evil/index-dotdot"), 8, "is not a plain file name"),
    Case("index-absolute", lambda c: c.root_args("--model", "evil/index-absolute"), 8, "is not a plain file name"),
    Case("index-backslash", lambda c: c.root_args("--model", "evil/index-backslash"), 8,
         "is not a plain file name"),
    Case("index-subfolder", lambda c: c.root_args("--model", "evil/index-subfolder"), 8,
         "is not a plain file name"),
    Case("index-shard-not-in-repo", lambda c: c.root_args("--model", "evil/index-shard-not-in-repo"), 8,
         "has no model-00009-of-00009.safetensors"),
    Case("index-not-json", lambda c: c.root_args("--model", "evil/index-not-json"), 8, "is not valid JSON"),
    Case("index-no-weight-map", lambda c: c.root_args("--model", "evil/index-no-weight-map"), 8, "has no weight_map"),
    Case("config-json-not-json", lambda c: c.root_args("--model", "evil/config-not-json"), 8, "is not valid JSON"),
    Case("listing-hostile-names", lambda c: c.root_args("--model", "evil/listing"), 0, "ready in",
         fetched_ok=True),
    Case("listing-claims-a-petabyte", lambda c: c.root_args("--model", "evil/listing-claims-a-petabyte"), 9,
         "1000.0 TB still to download"),
    Case("header-longer-than-file", lambda c: c.root_args("--model", "evil/header-longer-than-file"), 8,
         "header needs 4104 bytes, the file has"),
    Case("header-gigantic", lambda c: c.root_args("--model", "evil/header-gigantic"), 8, "byte limit"),
    Case("header-not-json", lambda c: c.root_args("--model", "evil/header-not-json"), 8, "header that is not JSON"),
    Case("header-offsets-overlap", lambda c: c.root_args("--model", "evil/header-offsets-overlap"), 8,
         "overlaps another tensor"),
    Case("header-offsets-past-end", lambda c: c.root_args("--model", "evil/header-offsets-past-end"), 8,
         "is truncated: header accounts for"),
]


@pytest.fixture(scope="module")
def evil_hub() -> Iterator[HubServer]:
    with HubServer() as server:
        server.add_repo(TINY, vit_repo_files())
        for repo_id, files in HOSTILE.items():
            server.add_repo(repo_id, files)
        server.add_repo("evil/listing", HOSTILE_LISTING)
        server.listed_sizes[f"evil/listing-claims-a-petabyte/{MODEL}"] = 10**15
        yield server


@pytest.fixture(scope="module")
def good_checkpoint(evil_hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint fetched once by the real CLI; each case gets a copy in its dino_root."""
    home = tmp_path_factory.mktemp("home")
    root = tmp_path_factory.mktemp("good") / "dinov3"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DINOV3_FETCHER_"))}
    env.update(HF_ENDPOINT=evil_hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               NO_PROXY="127.0.0.1,127.0.0.2")
    proc = subprocess.run([sys.executable, "-m", "dinov3_fetcher", "--dino-root", str(root), "--model", TINY],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return root


def snapshot(top: Path, skip: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under ``top`` except ``skip``: relative path -> (size, sha256)."""
    out: dict[str, tuple[int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in (skip, top / "readonly")]
        out[d.relative_to(top).as_posix() + "/"] = (0, "")
        for n in filenames:
            p = d / n
            if p.is_symlink() or not stat.S_ISREG(p.lstat().st_mode):  # a link, a FIFO a case planted
                out[p.relative_to(top).as_posix()] = (p.lstat().st_mode, "")
                continue
            out[p.relative_to(top).as_posix()] = (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out




@pytest.mark.parametrize("rev", ["bad rev", "../x", "x~1", "main/"])
def test_a_malformed_revision_is_refused_before_any_request(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                                            run_cli: Any, rev: str) -> None:
    r = run_cli("--dino-root", str(dino_root), "--model", TINY, f"--revision={rev}")
    assert r.returncode == 3, r.stderr
    assert "revision" in error_line(r.stderr)
    assert not hub.requests


# The first run covers every kind of case; a few variants of the same check run with -m slow.
SLOW_IDS = {"config-train-not-object", "dino-model-not-a-string", "model-three-parts", "model-dotdot",
            "index-subfolder", "index-no-weight-map", "header-not-json", "revision-malformed"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW_IDS else [])
                                  for c in CASES])
def test_bad_input(case: Case, evil_hub: HubServer, good_checkpoint: Path, tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch, run_cli: Any) -> None:
    monkeypatch.setenv("HF_ENDPOINT", evil_hub.endpoint)
    dino_root = tmp_path / "work" / "dinov3"
    shutil.copytree(good_checkpoint, dino_root)
    ctx = Ctx(tmp_path, dino_root, evil_hub)
    args = case.args(ctx)
    outside_before = snapshot(tmp_path, dino_root)
    inside_before = checkpoint_tree(dino_root)
    try:
        proc = run_cli(*args, cwd=tmp_path, timeout=60)
    finally:
        for m in (tmp_path / "readonly",):
            if m.is_mount():
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
    assert proc.returncode == case.code, proc.stderr
    assert case.message in proc.stderr, proc.stderr
    if case.code:
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dinov3-fetcher: error: "), proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    # Nothing outside dino_root was written (the config file the case wrote itself aside).
    assert snapshot(tmp_path, dino_root) == outside_before
    for stray in ("evil.safetensors", "outside.txt", "up.safetensors"):
        assert not (tmp_path / stray).exists() and not (tmp_path / "work" / stray).exists()
    assert not Path("/tmp/evil.safetensors").exists() and not Path("/etc/evil.json").exists()
    # The good checkpoint is unchanged (a successful re-publish may only rewrite the manifest).
    after = checkpoint_tree(dino_root)
    if case.fetched_ok:
        assert {k: v for k, v in after.items() if k in GOOD_FILES} == \
            {k: v for k, v in inside_before.items() if k in GOOD_FILES}
        assert set(after) - set(inside_before) <= {".dinov3-fetcher/manifest.json"}
    else:
        assert after == inside_before


def test_a_dino_root_whose_downloads_reach_path_max_is_a_config_error_naming_the_path(
        hub: HubServer, tiny: dict[str, bytes], tmp_path: Path, run_cli: Any) -> None:
    """A dino_root a few bytes short of PATH_MAX (4096) can be created, the files a fetch writes under it cannot:
    exit 3, one line naming the errno, the path and the fix (never exit 1); a second try says the same."""
    room = 4000 - len(str(tmp_path)) - 1
    root = tmp_path / "/".join(["d" * 250] * (room // 251) + ["d" * (room % 251 - 1)])
    for _ in range(2):
        proc = run_cli("--dino-root", str(root), "--model", TINY, "--json")
        assert proc.returncode == 3, proc.stderr
        (line,) = proc.stderr.splitlines()
        assert line.startswith(f"dinov3-fetcher: error: cannot use {root} as dino_root: its path (or a name in it) "
                               "is longer than the system allows (ENAMETOOLONG on "), line
        assert line.endswith("-> point train.dino_root (or --dino-root) at a folder on a local or network disk, "
                             "e.g. ./dinov3")
        assert json.loads(proc.stdout)["error"]["exit_code"] == 3


def test_a_gigabyte_passed_as_the_config_is_refused_from_its_size(tmp_path: Path) -> None:
    """An annotations.json given by mistake: refused from its stat, never read into memory."""
    big = tmp_path / "annotations.json"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: a gigabyte that costs no disk
    probe = ("import resource, subprocess, sys; "
             "p = subprocess.run([sys.executable, '-m', 'dinov3_fetcher', '--config', sys.argv[1]], "
             "capture_output=True, text=True); "
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(p.stderr)")
    proc = subprocess.run([sys.executable, "-c", probe, str(big)], capture_output=True, text=True, timeout=120)
    first, _, stderr = proc.stdout.partition("\n")
    code, max_rss_kib = map(int, first.split())
    assert code == 3, stderr
    assert f"config file {big} is 1.1 GB, more than such a file may be (16.8 MB)" in stderr, stderr
    assert max_rss_kib < 200 * 1024  # the CLI's own size, not the file's


@pytest.mark.parametrize("damage", ["verified-at-a-string", "fetched-at-1e300", "files-a-list", "a-fifo"])
def test_info_reports_a_damaged_manifest_as_damaged(good_checkpoint: Path, tmp_path: Path, run_cli: Any,
                                                    damage: str) -> None:
    root = tmp_path / "dinov3"
    shutil.copytree(good_checkpoint, root)
    path = root / ".dinov3-fetcher" / "manifest.json"
    doc = json.loads(path.read_bytes())
    if damage == "a-fifo":
        path.unlink()
        os.mkfifo(path)
    else:
        key, value = {"verified-at-a-string": ("verified_at", "yesterday"), "fetched-at-1e300": ("fetched_at", 1e300),
                      "files-a-list": ("files", [1, 2])}[damage]
        doc[key] = value
        path.write_text(json.dumps(doc))
    for args in ([], ["--json"]):
        proc = run_cli("info", "--dino-root", str(root), "--model", TINY, *args, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "unexpected error" not in proc.stderr
    assert json.loads(proc.stdout)["manifest_damage"]
    text = run_cli("info", "--dino-root", str(root), "--model", TINY, timeout=60).stdout
    assert "model:      unknown: the manifest is damaged (" in text and "does NOT match" in text, text
