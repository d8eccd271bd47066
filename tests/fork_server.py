"""A fork server for the ranks of the multi-process tests (``launch.forked``) and, with ``--cli``, for the command
line's runs (``launch.cli``): it imports huggingface_hub and the fetcher once (and torch, for the ranks), then
forks one child per run, each a real, separate process that runs its worker script as ``python worker.py ARGS``
would, or ``python -m MODULE ARGS`` (its own environment, argv, working folder, stdin, stdout and stderr files),
with gloo over TCP, signals and files of its own. Only the interpreter's start-up and the imports are shared.

It runs with no thread, no socket and no process group of its own, so a child inherits nothing that runs. The
protocol, one JSON object a line: on stdin ``{"id", "argv", "env", "cwd", "stdout", "stderr"[, "stdin"]}`` starts
a child (answer ``{"id", "pid"}``), ``{"signal": SIG, "id": ID}`` signals one still running; on stdout ``{"pid",
"returncode"}`` when a child ends (as ``Popen.returncode``: -N for a signal). At the end of stdin it kills the
children still running, and ends.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

_ANSWERS = os.dup(1)  # the answers' pipe; this process's own prints go to stderr
os.dup2(2, 1)

# What every child imports (the bulk of its start-up): here once.
import dinov3_fetcher._cli  # noqa: E402
import dinov3_fetcher._commands  # noqa: E402
import dinov3_fetcher._fetch  # noqa: E402
from dinov3_fetcher._sources import hf  # noqa: E402

if "--cli" in sys.argv[1:]:
    # The command line's runs: huggingface_hub's own modules are left to each run, which imports them the way a
    # fresh process does (their settings are read from the environment as they are imported, after the
    # fetcher's own checks of it); what they build on reads nothing at import.
    import filelock
    import httpcore2
    import httpx2
    import yaml

    import dinov3_fetcher._headstart
    import dinov3_fetcher._plan
    import dinov3_fetcher._transfer
    import dinov3_fetcher._validate

    assert filelock and httpcore2 and httpx2 and yaml
else:  # the ranks: torch, and huggingface_hub (its settings read again in each child)
    import torch
    import torch.distributed

    import dinov3_fetcher._broadcast.job
    import dinov3_fetcher._broadcast.receiver
    import dinov3_fetcher._broadcast.sender
    import dinov3_fetcher._distributed

    hf.load_api()  # huggingface_hub and its HfApi
    assert torch and torch.distributed
assert dinov3_fetcher


def _run(req: dict[str, Any], inherited: list[int]) -> int:
    """In the child: become the rank ``req`` describes and run its script; its exit status."""
    for fd in inherited:
        os.close(fd)
    for fd, path, flags in ((0, req.get("stdin") or os.devnull, os.O_RDONLY),
                            (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        if new != fd:
            os.dup2(new, fd)
            os.close(new)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has them
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        importlib.reload(constants)  # it reads HF_HOME, HF_ENDPOINT... once, at import
    script = req["argv"][0]
    code: Any = 0
    try:
        if script == "-m":  # python -m MODULE ARGS
            sys.argv = ["-m", *req["argv"][2:]]  # run_module puts the module's file first, as -m does
            sys.path[0] = str(Path.cwd())
            runpy.run_module(req["argv"][1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(req["argv"])
            sys.path[0] = str(Path(script).resolve().parent)
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # as at the end of a process: non-daemon threads end
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if code == -signal.SIGINT:  # an uncaught Ctrl-C ends the process by the signal, as Python does
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return int(code) & 0xFF


def main() -> None:
    answers = os.fdopen(_ANSWERS, "w", buffering=1)
    running: dict[int, tuple[int, int]] = {}  # pidfd -> pid, request id
    pending = b""
    while True:
        ready, _, _ = select.select([0, *running], [], [])
        for fd in ready:
            if fd != 0:
                pid, _ = running.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                answers.write(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}) + "\n")
                continue
            data = os.read(0, 1 << 16)
            if not data:
                for pidfd in running:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                for pid, _ in running.values():
                    os.waitpid(pid, 0)
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                req = json.loads(line)
                if "signal" in req:
                    for pidfd, (_, rid) in running.items():
                        if rid == req["id"]:
                            with contextlib.suppress(ProcessLookupError):
                                signal.pidfd_send_signal(pidfd, req["signal"])
                    continue
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    os._exit(_run(req, [_ANSWERS, *running]))
                running[os.pidfd_open(pid)] = (pid, req["id"])
                answers.write(json.dumps({"id": req["id"], "pid": pid}) + "\n")


if __name__ == "__main__":
    main()
