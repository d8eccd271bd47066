"""The fetch path end to end, in process, against the local Hub emulator with the real huggingface_hub client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from checkpoints import convnext_repo_files, shard_files, vit_config, vit_repo_files
from conftest import GRANTED, NOTGRANTED, TINY
from dinov3_fetcher import fetch_dinov3, validate_dinov3
from dinov3_fetcher._errors import (
    AuthenticationError,
    IntegrityError,
    LocalEntryNotFoundError,
    NetworkError,
    NotDinov3Error,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from dinov3_fetcher._state import StateDir
from helpers import dead_pid, fetch
from hub_server import HubServer

FETCHED = {"config.json", "preprocessor_config.json", "model.safetensors", "README.md", "LICENSE.md"}


def visible(root: Path) -> set[str]:
    return {p.name for p in root.iterdir() if not p.name.startswith(".")}


def assert_same_bytes(root: Path, files: dict[str, bytes], names: set[str]) -> None:
    for name in names:
        assert (root / name).read_bytes() == files[name], name


def test_cold_fetch_gives_the_servers_bytes(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    path = fetch_dinov3(dino_root, TINY)
    assert path == dino_root
    assert visible(dino_root) == FETCHED  # no .gitattributes, no model.pth duplicate
    assert_same_bytes(dino_root, tiny, FETCHED)
    assert validate_dinov3(dino_root)
    manifest = json.loads((dino_root / ".dinov3-fetcher" / "manifest.json").read_text())
    assert manifest["repo_id"] == TINY and manifest["revision"] == "main" and len(manifest["commit"]) == 40
    assert manifest["complete"] is True and manifest["tool_version"]
    import hashlib

    for name in FETCHED:
        assert manifest["files"][name]["sha256"] == hashlib.sha256(tiny[name]).hexdigest()
        assert manifest["files"][name]["size"] == len(tiny[name])
    assert not any(r.path.endswith((".gitattributes", "model.pth")) for r in hub.requests)
    assert not list((dino_root / ".dinov3-fetcher" / "partial").iterdir())  # nothing left over


def test_warm_run_makes_zero_requests(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    fetch_dinov3(dino_root, TINY)
    hub.clear()
    result = fetch(dino_root, TINY)
    assert result.cached and hub.requests == []


def test_pinned_commit_warm_run_never_asks_and_records_commit(hub: HubServer, dino_root: Path):
    first = hub.add_repo(TINY, vit_repo_files(seed=1))
    hub.add_commit(TINY, {"README.md": b"# changed\n"})
    result = fetch(dino_root, TINY, revision=first)
    assert result.commit == first
    hub.clear()
    assert fetch(dino_root, TINY, revision=first).cached and hub.requests == []


def test_model_switch_replaces_the_checkpoint_whole(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    other = "tiny-org/dinov3-convnext-tiny"
    cn = shard_files(convnext_repo_files(seed=3), 2)
    hub.add_repo(other, cn)
    fetch_dinov3(dino_root, TINY)
    fetch_dinov3(dino_root, other)
    names = visible(dino_root)
    assert "model.safetensors" not in names  # the ViT's weights are gone, not mixed with the ConvNeXt's
    assert {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"} <= names
    assert_same_bytes(dino_root, cn, names)
    assert StateDir(dino_root).read_manifest().repo_id == other  # type: ignore[union-attr]
    assert validate_dinov3(dino_root)


def test_sharded_checkpoint(hub: HubServer, dino_root: Path):
    files = shard_files(vit_repo_files(seed=2), 3)
    hub.add_repo(TINY, files)
    fetch_dinov3(dino_root, TINY)
    wanted = {n for n in files if n not in (".gitattributes", "model.pth")}
    assert visible(dino_root) == wanted
    assert_same_bytes(dino_root, files, wanted)
    (dino_root / "model-00002-of-00003.safetensors").unlink()
    assert not validate_dinov3(dino_root)  # the index names a shard that is gone


def test_resume_after_cut_fetches_only_the_missing_bytes(hub: HubServer, dino_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~ 13 MB
    size = len(files["model.safetensors"])
    hub.add_repo(TINY, files)
    cut = size // 2
    hub.faults.add(cut_after=cut, path_suffix="model.safetensors", host="cdn")
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError) as info:
        fetch_dinov3(dino_root, TINY)
    assert "resumes" in info.value.hint
    assert not validate_dinov3(dino_root) and not (dino_root / "model.safetensors").exists()
    hub.faults.clear()
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    again = hub.bytes_served("model.safetensors")
    assert size - cut <= again <= size - cut + 1024 * 1024  # only the missing part (+ at most one block)
    first = next(r for r in hub.file_gets("model.safetensors") if r.host == "cdn")
    assert (first.range or "").startswith("bytes=")
    assert (dino_root / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_cut_connections_are_retried_within_one_run(hub: HubServer, dino_root: Path):
    files = vit_repo_files(hidden=128, intermediate=512, layers=4)
    hub.add_repo(TINY, files)
    hub.faults.add(cut_after=100_000, path_suffix="model.safetensors", host="cdn", times=3)
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert len(hub.file_gets("model.safetensors")) >= 4


def test_server_ignoring_range_still_gives_a_correct_file(hub: HubServer, dino_root: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)
    hub.add_repo(TINY, files)
    hub.faults.add(cut_after=3_000_000, path_suffix="model.safetensors", host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    hub.faults.add(ignore_range=True)
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_corrupt_bytes_are_refused_and_never_published(hub: HubServer, dino_root: Path):
    good = vit_repo_files(seed=1)
    hub.add_repo(TINY, good)
    fetch_dinov3(dino_root, TINY)
    before = {p.name: p.read_bytes() for p in dino_root.iterdir() if p.is_file()}
    hub.add_commit(TINY, {"model.safetensors": vit_repo_files(seed=2)["model.safetensors"]})
    hub.faults.add(corrupt_at=1000, path_suffix="model.safetensors")
    with pytest.raises(IntegrityError) as info:
        fetch(dino_root, TINY, update=True)
    assert "sha256" in info.value.message and "discarded" in info.value.message
    after = {p.name: p.read_bytes() for p in dino_root.iterdir() if p.is_file()}
    assert after == before and validate_dinov3(dino_root)  # the good checkpoint is untouched
    assert not list((dino_root / ".dinov3-fetcher" / "partial").iterdir())  # the bad bytes are gone


def test_a_shard_name_too_long_for_a_staging_prefix_is_fetched(hub: HubServer, dino_root: Path):
    files = shard_files(vit_repo_files(), 2)
    long = "w" * 200 + "-00001-of-00002.safetensors"  # 227 bytes: a valid file name, not with a 65-byte prefix
    files[long] = files.pop("model-00001-of-00002.safetensors")
    index = json.loads(files["model.safetensors.index.json"])
    index["weight_map"] = {k: long if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo(TINY, files)
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / long).read_bytes() == files[long]
    assert validate_dinov3(dino_root)


def test_gated_repo_without_token(hub: HubServer, dino_root: Path):
    hub.add_repo(TINY, vit_repo_files(), gated=True)
    with pytest.raises(AuthenticationError) as info:
        fetch_dinov3(dino_root, TINY)
    err = info.value
    assert err.status == 401 and "no token" in err.message
    assert f"https://huggingface.co/{TINY}" in err.hint and "HF_TOKEN" in err.hint and "request access" in err.hint
    assert not hub.file_gets("model.safetensors")  # stopped before the weights


def test_gated_repo_with_token_not_granted(hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch):
    hub.add_repo(TINY, vit_repo_files(), gated=True)
    monkeypatch.setenv("HF_TOKEN", NOTGRANTED)
    with pytest.raises(AuthenticationError) as info:
        fetch_dinov3(dino_root, TINY)
    assert info.value.status == 403 and "not been granted" in info.value.message
    assert f"https://huggingface.co/{TINY}" in info.value.hint


def test_gated_repo_with_granted_token(hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch):
    files = vit_repo_files()
    hub.add_repo(TINY, files, gated=True)
    hub.grant(TINY, GRANTED)
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    fetch_dinov3(dino_root, TINY)
    assert_same_bytes(dino_root, files, FETCHED)
    hub_gets = [r for r in hub.requests if r.host == "hub"]
    assert all(r.headers.get("authorization") == f"Bearer {GRANTED}" for r in hub_gets if "/resolve/" in r.path)
    assert all("authorization" not in r.headers for r in hub.requests if r.host == "cdn")


def test_invalid_token(hub: HubServer, tiny: dict[str, bytes], dino_root: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(AuthenticationError) as info:
        fetch_dinov3(dino_root, TINY)
    assert "rejected the token" in info.value.message and "hf_not_a_real_token" not in str(info.value)


def test_missing_repo(hub: HubServer, dino_root: Path):
    with pytest.raises(RepositoryNotFoundError) as info:
        fetch_dinov3(dino_root, "nobody/dinov3-nothing")
    assert "nobody/dinov3-nothing" in info.value.message and info.value.exit_code == 5


def test_missing_revision(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    with pytest.raises(RevisionNotFoundError) as info:
        fetch_dinov3(dino_root, TINY, revision="v9.9")
    assert "v9.9" in info.value.message


def test_non_dinov3_repo_is_refused_before_the_weights(hub: HubServer, dino_root: Path):
    files = vit_repo_files()
    files["config.json"] = json.dumps({"model_type": "vit", "hidden_size": 32}).encode()
    hub.add_repo("someone/plain-vit", files)
    with pytest.raises(NotDinov3Error) as info:
        fetch_dinov3(dino_root, "someone/plain-vit")
    assert "'vit'" in info.value.message
    assert not hub.file_gets("model.safetensors")
    assert not validate_dinov3(dino_root)


def test_official_id_whose_config_disagrees_with_the_registry(hub: HubServer, dino_root: Path):
    repo = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    hub.add_repo(repo, vit_repo_files(hidden=384, intermediate=1536, layers=2, heads=6))
    with pytest.raises(NotDinov3Error, match="ViT-L/16"):
        fetch_dinov3(dino_root, repo)


def test_weights_that_disagree_with_the_config_are_refused(hub: HubServer, dino_root: Path):
    files = vit_repo_files()
    files["config.json"] = json.dumps(vit_config(layers=3)).encode()
    hub.add_repo(TINY, files)
    with pytest.raises(NotDinov3Error, match="3 layers"):
        fetch_dinov3(dino_root, TINY)
    assert not validate_dinov3(dino_root)


def test_convnext(hub: HubServer, dino_root: Path):
    files = convnext_repo_files()
    hub.add_repo("tiny-org/dinov3-convnext", files)
    fetch_dinov3(dino_root, "tiny-org/dinov3-convnext")
    assert_same_bytes(dino_root, files, FETCHED)


def test_offline_with_a_complete_checkpoint(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                            monkeypatch: pytest.MonkeyPatch):
    fetch_dinov3(dino_root, TINY)
    hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fetch_dinov3(dino_root, TINY) == dino_root and hub.requests == []


def test_offline_without_a_checkpoint(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                      monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LocalEntryNotFoundError) as info:
        fetch_dinov3(dino_root, TINY)
    assert "HF_HUB_OFFLINE" in info.value.message and hub.requests == []
    assert isinstance(info.value, FileNotFoundError)


def test_offline_with_a_partial_checkpoint(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    fetch_dinov3(dino_root, TINY)
    (dino_root / "model.safetensors").write_bytes(b"truncated")
    hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LocalEntryNotFoundError, match=r"model\.safetensors"):
        fetch_dinov3(dino_root, TINY)
    assert hub.requests == []


def test_a_damaged_checkpoint_is_repaired_by_the_next_fetch(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    fetch_dinov3(dino_root, TINY)
    (dino_root / "model.safetensors").write_bytes(tiny["model.safetensors"][:1000])
    assert not validate_dinov3(dino_root)
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == tiny["model.safetensors"]
    assert not hub.file_gets("config.json")  # intact files are not downloaded again


def test_update_fetches_only_changed_files(hub: HubServer, tiny: dict[str, bytes], dino_root: Path):
    fetch_dinov3(dino_root, TINY)
    new_card = b"# new model card\n"
    new = hub.add_commit(TINY, {"README.md": new_card})
    hub.clear()
    assert fetch(dino_root, TINY).cached and hub.requests == []  # a branch is not re-checked by default
    result = fetch(dino_root, TINY, update=True)
    assert result.commit == new and (dino_root / "README.md").read_bytes() == new_card
    assert {r.path.rsplit("/", 1)[-1] for r in hub.file_gets()} == {"README.md"}


def test_partial_of_a_file_that_changed_is_discarded_not_spliced(hub: HubServer, dino_root: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    old = vit_repo_files(hidden=256, intermediate=1024, layers=4, seed=1)
    hub.add_repo(TINY, old)
    hub.faults.add(cut_after=4_000_000, path_suffix="model.safetensors", host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    new = vit_repo_files(hidden=256, intermediate=1024, layers=4, seed=2)
    hub.add_commit(TINY, {"model.safetensors": new["model.safetensors"]})
    hub.clear()
    fetch_dinov3(dino_root, TINY)
    assert (dino_root / "model.safetensors").read_bytes() == new["model.safetensors"]
    assert hub.bytes_served("model.safetensors") == len(new["model.safetensors"])
    assert not list((dino_root / ".dinov3-fetcher" / "partial").iterdir())  # the stale partial is gone


def kill_claim(dino_root: Path) -> Path:
    """Make the released partial folder look like the claim of a fetcher that was SIGKILLed mid-download."""
    from dinov3_fetcher._state import host

    _HOST = host()

    (released,) = [p for p in (dino_root / ".dinov3-fetcher" / "partial").iterdir() if "." not in p.name]
    claimed = released.with_name(f"{released.name}.{_HOST}.{dead_pid()}")
    released.rename(claimed)
    return claimed


def mark_publish_interrupted(dino_root: Path) -> None:
    state = StateDir(dino_root)
    m = state.read_manifest()
    assert m is not None
    m.complete = False
    state.write_manifest(m)


def test_a_sigkilled_claim_counts_as_present_for_dry_run_and_the_space_check(
        hub: HubServer, dino_root: Path, monkeypatch: pytest.MonkeyPatch):
    import shutil

    from dinov3_fetcher._errors import DiskSpaceError
    from helpers import plan

    files = vit_repo_files(hidden=256, intermediate=1024, layers=4)  # ~ 13 MB
    size = len(files["model.safetensors"])
    hub.add_repo(TINY, files)
    hub.faults.add(cut_after=4_000_000, path_suffix="model.safetensors", host="cdn", times=1)
    monkeypatch.setenv("DINOV3_FETCHER_RETRIES", "0")
    with pytest.raises(NetworkError):
        fetch_dinov3(dino_root, TINY)
    have = next(f.present for f in plan(dino_root, TINY).files if f.name == "model.safetensors")
    assert have >= 3_000_000
    kill_claim(dino_root)
    after = plan(dino_root, TINY)
    assert next(f.present for f in after.files if f.name == "model.safetensors") == have

    # README and LICENSE are fetched beside the weights: whether they got in before the cut is a race, and
    # they count as whatever is on disk of them
    small = sum(f.size - f.present for f in after.files if f.name in ("README.md", "LICENSE.md"))
    assert small in (0, len(files["README.md"]), len(files["LICENSE.md"]),
                     len(files["README.md"]) + len(files["LICENSE.md"]))
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(DiskSpaceError) as info:
        fetch_dinov3(dino_root, TINY)
    assert info.value.needed == size - have + small


def test_dry_run_neither_adopts_nor_hashes(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                           monkeypatch: pytest.MonkeyPatch):
    import hashlib

    from dinov3_fetcher import _plan as fetch_module
    from dinov3_fetcher._state import host

    _HOST = host()
    from helpers import plan

    fetch_dinov3(dino_root, TINY)
    mark_publish_interrupted(dino_root)
    new = vit_repo_files(seed=5)["model.safetensors"]
    hub.add_commit(TINY, {"model.safetensors": new})
    dead = dino_root / ".dinov3-fetcher" / "staged" / f"{_HOST}.{dead_pid()}"
    dead.mkdir(parents=True)
    staged = dead / f"{hashlib.sha256(new).hexdigest()}.model.safetensors"
    staged.write_bytes(new)

    def no_hashing(path: Path, progress: object = None) -> str:
        raise AssertionError(f"a dry run hashed {path}")

    monkeypatch.setattr(fetch_module, "sha256_file", no_hashing)
    dry = plan(dino_root, TINY)
    files = {f.name: f for f in dry.files}
    assert files["model.safetensors"].reuse and files["model.safetensors"].present == len(new)
    assert not files["config.json"].reuse  # published, but the manifest is incomplete: not hashed, not counted
    assert staged.read_bytes() == new and [p.name for p in dead.parent.iterdir()] == [dead.name]


def test_an_interrupted_publish_hashes_each_file_once(hub: HubServer, tiny: dict[str, bytes], dino_root: Path,
                                                      monkeypatch: pytest.MonkeyPatch):
    from collections import Counter

    from dinov3_fetcher import _plan as fetch_module

    fetch_dinov3(dino_root, TINY)
    mark_publish_interrupted(dino_root)
    hashed: Counter[str] = Counter()
    real = fetch_module.sha256_file

    def counting(path: Path, progress: object = None) -> str:
        hashed[path.name] += 1
        return real(path)

    monkeypatch.setattr(fetch_module, "sha256_file", counting)
    hub.clear()
    result = fetch(dino_root, TINY)
    assert result.cached and not hub.file_gets()
    assert set(hashed) == FETCHED and set(hashed.values()) == {1}, hashed
    assert validate_dinov3(dino_root)


def test_update_with_nothing_new_keeps_the_verification_times(hub: HubServer, tiny: dict[str, bytes],
                                                              dino_root: Path):
    fetch_dinov3(dino_root, TINY)
    state = StateDir(dino_root)
    m = state.read_manifest()
    assert m is not None
    m.verified_at, m.verified_deep_at = 1000.0, 2000.0
    state.write_manifest(m)
    hub.clear()
    result = fetch(dino_root, TINY, update=True)
    assert result.cached and result.requests_made and not hub.file_gets()
    after = state.read_manifest()
    assert after is not None and after.complete and after.commit == m.commit
    assert (after.verified_at, after.verified_deep_at) == (1000.0, 2000.0)
    assert not fetch(dino_root, TINY).requests_made  # the warm path asks nothing

    new = hub.add_commit(TINY, {"README.md": b"# changed\n"})
    result = fetch(dino_root, TINY, update=True)
    after = state.read_manifest()
    assert after is not None and after.commit == new and after.verified_at is None  # new files: not verified


def test_publish_removes_only_our_files_and_conflicting_weight_names(hub: HubServer, tiny: dict[str, bytes],
                                                                     dino_root: Path):
    other = "tiny-org/dinov3-convnext-tiny"
    hub.add_repo(other, shard_files(convnext_repo_files(seed=3), 2))
    fetch_dinov3(dino_root, TINY)
    (dino_root / "model_student.safetensors").write_bytes(b"mine")
    (dino_root / "model-best.index.json").write_bytes(b"{}")
    fetch_dinov3(dino_root, other)
    assert (dino_root / "model_student.safetensors").read_bytes() == b"mine"
    assert (dino_root / "model-best.index.json").exists()
    assert not (dino_root / "model.safetensors").exists()  # listed in the old manifest

    # No manifest: a standard weight file would be loaded instead of ours, but nothing proves it is ours to
    # remove: the fetch refuses and touches nothing; the user moves them, and it goes on.
    from dinov3_fetcher._errors import ConfigError

    bare = dino_root.parent / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes(b"stray")
    (bare / "model-00009-of-00009.safetensors").write_bytes(b"stray")
    (bare / "model_student.safetensors").write_bytes(b"mine")
    with pytest.raises(ConfigError) as info:
        fetch_dinov3(bare, other)
    assert "model-00009-of-00009.safetensors, model.safetensors" in info.value.message
    assert (bare / "model.safetensors").read_bytes() == b"stray"
    (bare / "model.safetensors").unlink()
    (bare / "model-00009-of-00009.safetensors").unlink()
    fetch_dinov3(bare, other)
    assert (bare / "model_student.safetensors").read_bytes() == b"mine"
    assert validate_dinov3(bare)


@pytest.mark.parametrize("missing", ["config.json", "preprocessor_config.json"])
def test_a_repo_without_a_config_is_not_dinov3(hub: HubServer, dino_root: Path, missing: str):
    hub.add_repo(TINY, {k: v for k, v in vit_repo_files().items() if k != missing})
    with pytest.raises(NotDinov3Error) as info:
        fetch_dinov3(dino_root, TINY)
    assert info.value.exit_code == 7
    assert f"{TINY} has no {missing}: not a transformers DINOv3 checkpoint" in info.value.message
