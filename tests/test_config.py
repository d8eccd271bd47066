"""Pipeline config -> FetchRequest: path resolution, precedence, and each way a config can be unusable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinov3_fetcher._config import DEFAULT_REVISION, check_repo_id, resolve_request
from dinov3_fetcher._errors import ConfigError
from dinov3_fetcher._registry import DEFAULT_MODEL


def write(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def test_relative_dino_root_resolves_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = write(tmp_path / "proj" / "config.json",
                {"paths": {"dataset_root": "dataset"}, "train": {"dino_root": "dinov3"}})
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder
    req = resolve_request(cfg)
    assert req.dino_root == tmp_path / "proj" / "dinov3"
    assert (req.model, req.revision) == (DEFAULT_MODEL, DEFAULT_REVISION)


def test_nested_relative_and_dotdot(tmp_path: Path):
    cfg = write(tmp_path / "a" / "b" / "config.json", {"train": {"dino_root": "../models/dino"}})
    assert resolve_request(cfg).dino_root == tmp_path / "a" / "models" / "dino"


def test_absolute_dino_root_is_taken_as_given(tmp_path: Path):
    cfg = write(tmp_path / "config.json", {"train": {"dino_root": str(tmp_path / "elsewhere" / "d")}})
    assert resolve_request(cfg).dino_root == tmp_path / "elsewhere" / "d"


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = write(tmp_path / "config.json", {"train": {"dino_root": "~/dino"}})
    assert resolve_request(cfg).dino_root == tmp_path / "home" / "dino"


def test_flags_win_over_config_which_wins_over_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cfg = write(tmp_path / "config.json", {"train": {"dino_root": "d", "dino_model": "org/dinov3-a",
                                                     "dino_revision": "v1", "unknown_key": 1}})
    req = resolve_request(cfg)
    assert (req.model, req.revision) == ("org/dinov3-a", "v1")
    monkeypatch.chdir(tmp_path / "")
    req = resolve_request(cfg, dino_root="flag_root", model="org/dinov3-b", revision="main")
    assert req.dino_root == tmp_path / "flag_root"  # --dino-root is relative to the working directory
    assert (req.model, req.revision) == ("org/dinov3-b", "main")


def test_dino_root_flag_without_config(tmp_path: Path):
    req = resolve_request(None, dino_root=tmp_path / "x")
    assert req.dino_root == tmp_path / "x" and req.config_path is None


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "not an object"),
        ({"paths": {}}, 'no "train" section'),
        ({"train": []}, "not an object"),
        ({"train": {}}, "train.dino_root is missing"),
        ({"train": {"dino_root": ""}}, "is empty"),
        ({"train": {"dino_root": 3}}, "must be a string"),
        ({"train": {"dino_root": "d", "dino_model": 5}}, "train.dino_model"),
    ],
)
def test_unusable_configs_raise_config_error(tmp_path: Path, content: object, fragment: str):
    path = tmp_path / "config.json"
    if content is not None:
        write(path, content)
    with pytest.raises(ConfigError) as info:
        resolve_request(path)
    assert fragment in info.value.message
    assert info.value.hint  # every error says what to do
    assert info.value.exit_code == 3


def test_config_path_is_a_folder(tmp_path: Path):
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_request(tmp_path)


def test_dino_root_pointing_at_a_file(tmp_path: Path):
    write(tmp_path / "afile", "x")
    cfg = write(tmp_path / "config.json", {"train": {"dino_root": "afile"}})
    with pytest.raises(ConfigError, match="is a file"):
        resolve_request(cfg)


@pytest.mark.parametrize("bad", ["", "  ", "noslash", "a/b/c", "../x", "a/..", "-a/b", "a--b/c", "a/" + "x" * 100,
                                 "a b/c", "a/b\\c"])
def test_malformed_repo_ids(bad: str):
    with pytest.raises(ConfigError):
        check_repo_id(bad)


@pytest.mark.parametrize("good", ["facebook/dinov3-vitl16-pretrain-lvd1689m", "me/my.model_v2", "A1/b-c"])
def test_good_repo_ids(good: str):
    assert check_repo_id(good) == good
