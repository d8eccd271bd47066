"""The shapes of ids: a repo id (``namespace/name``), a 40-hex commit, a 64-hex sha256."""

from __future__ import annotations

import re

__all__ = ["is_commit", "is_repo_id", "is_sha256"]

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_repo_id(name: str) -> bool:
    """Is ``name`` of the form ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``; no ``..``)?"""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


def is_commit(revision: str) -> bool:
    """Is ``revision`` a 40-hex commit id (lower case)?"""
    return bool(_COMMIT.fullmatch(revision))


def is_sha256(value: str) -> bool:
    """Is ``value`` a 64-hex sha256 (lower case)?"""
    return bool(_SHA256.fullmatch(value))
