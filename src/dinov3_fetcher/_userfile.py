"""The one reader of files that a user names or that come from outside: the pipeline config, the registry file
(DINOV3_FETCHER_REGISTRY), SSL_CERT_FILE, the saved logins (huggingface_hub's token file, ModelScope's cookies),
and the JSON files of a checkpoint folder.

Only regular files are read: a FIFO, a device, a socket or a folder is refused from its ``stat`` and, should the
name be swapped meanwhile, from the ``fstat`` of a descriptor opened with ``O_NONBLOCK`` (opening a FIFO that way
never waits for a writer), so no name can make a command hang. Each kind has a size limit, checked before a byte
is read (a 1 GB annotations file passed as the config costs a ``stat``, not 1 GB of memory). ``parse_json`` turns
every way ``json.loads`` can fail (syntax, nesting deeper than the interpreter's recursion limit, an integer of
more than 4300 digits) into a ValueError whose text says why.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

__all__ = ["CONFIG_LIMIT", "COOKIES_LIMIT", "JSON_LIMIT", "PEM_LIMIT", "REGISTRY_LIMIT", "TOKEN_LIMIT", "Refused",
           "parse_json", "read_regular"]

CONFIG_LIMIT = 16 << 20  # a pipeline config: a few KB in practice
REGISTRY_LIMIT = 16 << 20  # release pins: about 200 bytes per model
COOKIES_LIMIT = 1 << 20  # a pickled cookie jar of one site
TOKEN_LIMIT = 64 << 10  # one token
PEM_LIMIT = 64 << 20  # a CA bundle (the system's is about 200 KB)
JSON_LIMIT = 64 << 20  # config.json, preprocessor_config.json and the index of a checkpoint

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


class Refused(ValueError):
    """A file that was not read; ``reason`` completes "<the file> ..." (e.g. "is a FIFO, not a regular file")."""

    def __init__(self, path: str | os.PathLike[str], reason: str, *, missing: bool = False) -> None:
        self.path = Path(path)
        self.reason = reason
        self.missing = missing  # it does not exist (callers often treat that as "not set")
        super().__init__(f"{path} {reason}")


def _size(n: int) -> str:
    from ._progress import human_bytes

    return human_bytes(n)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {name}, not a regular file"
    return "is not a regular file"


def _check(path: str | os.PathLike[str], st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Refused(path, _kind(st.st_mode))
    if st.st_size > limit:
        raise Refused(path, f"is {_size(st.st_size)}, more than such a file may be ({_size(limit)})")


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of ``path`` (links followed) if it is a regular file of at most ``limit`` bytes.

    Raises Refused (a ValueError) for anything else, never blocking: it does not exist (``missing``), it cannot be
    opened or read (permissions, a loop of links, a name too long, a NUL in it), it is not a regular file, or it
    is too large.
    """
    try:
        _check(path, Path(path).stat(), limit)
        fd = os.open(path, _FLAGS)
    except Refused:
        raise
    except FileNotFoundError:
        raise Refused(path, "does not exist", missing=True) from None
    except NotADirectoryError:
        raise Refused(path, "does not exist (a folder on its path is a file)", missing=True) from None
    except OSError as exc:
        raise Refused(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError:  # os.stat: "embedded null byte"
        raise Refused(path, "cannot be a file name (it holds a NUL character)") from None
    try:
        _check(path, os.fstat(fd), limit)  # what was opened, should the name have been swapped after the stat
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise Refused(path, f"cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if total > limit:  # it grew while being read
        raise Refused(path, f"is more than such a file may be ({_size(limit)})")
    return b"".join(chunks)


def parse_json(data: bytes | str) -> Any:
    """``json.loads(data)``; ValueError whose text completes "<the file> ..." for anything it cannot read."""
    try:
        return json.loads(data)
    except UnicodeDecodeError:
        raise ValueError("is not text (UTF-8)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except RecursionError:
        raise ValueError("is nested too deeply to be read as JSON") from None
    except ValueError as exc:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise ValueError(f"holds a number too long to read ({str(exc).split(':')[0]})") from None
