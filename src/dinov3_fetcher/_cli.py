"""The ``dinov3-fetcher`` command: parse flags, call the library, map errors to one line and an exit code.

Nothing else lives here: every command's work is done by a library function, ``--json`` and ``--quiet``
only change how its result is printed. Human text and progress go to stderr, data to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ._errors import EXIT_UNEXPECTED, EXIT_USAGE, FetcherError, exit_code_summary
from ._version import __version__

PROG = "dinov3-fetcher"
COMMANDS = ("fetch", "list", "verify", "info")

_EPILOG = """\
examples:
  dinov3-fetcher --config config.json                 fetch into the config's train.dino_root
  dinov3-fetcher --config config.json --model facebook/dinov3-vitb16-pretrain-lvd1689m
  dinov3-fetcher --dino-root ./dinov3 --revision <40-hex commit>
  dinov3-fetcher --config config.json --source modelscope --require-official
  dinov3-fetcher list                                 the DINOv3 variants
  dinov3-fetcher verify --config config.json --deep   re-hash every file
  dinov3-fetcher info --config config.json --json

environment: HF_TOKEN (gated repos), HF_ENDPOINT (mirror), HF_HUB_OFFLINE=1 (no network),
DINOV3_FETCHER_SOURCE (hf|modelscope), MODELSCOPE_ENDPOINT, MODELSCOPE_API_TOKEN, DINOV3_FETCHER_REGISTRY,
DINOV3_FETCHER_CONNECTIONS, DINOV3_FETCHER_LOCK_TIMEOUT, DINOV3_FETCHER_TIMEOUT, DINOV3_FETCHER_RETRIES.
exit codes: {exit_codes}
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout, errors included")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or messages on stderr")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="the pipeline's config.json (reads train.dino_root and "
                   "the optional train.dino_model / train.dino_revision)")
    p.add_argument("--dino-root", metavar="DIR", help="the checkpoint folder (overrides train.dino_root)")


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=("hf", "modelscope"), help="where to fetch from: hf (the Hugging Face Hub "
                   "or HF_ENDPOINT) or modelscope (MODELSCOPE_ENDPOINT) (default: train.dino_source, else "
                   "DINOV3_FETCHER_SOURCE, else hf)")


def _sub_epilog(*examples: str) -> str:
    return "examples:\n" + "".join(f"  {e}\n" for e in examples)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every command, with examples and the exit codes in each --help. ``only``: that
    command's parser alone (what parsing its arguments needs; the others cost a millisecond before a fetch's
    first connection)."""
    epilog = _EPILOG.format(exit_codes=exit_code_summary())
    parser = _Parser(prog=PROG, description="Fetch a DINOv3 teacher checkpoint from the Hugging Face Hub into "
                     "dino_root, resumable and verified byte for byte. Without a command: fetch.",
                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{fetch,list,verify,info}", parser_class=_Parser)

    if only in (None, "fetch"):
        _fetch_parser(sub, epilog)
    if only in (None, "list"):
        _list_parser(sub)
    if only in (None, "verify"):
        _verify_parser(sub)
    if only in (None, "info"):
        _info_parser(sub)
    return parser


def _fetch_parser(sub: Any, epilog: str) -> None:
    f = sub.add_parser("fetch", help="fetch the checkpoint (the default command)", epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _where(f)
    f.add_argument("--model", metavar="REPO_ID", help="Hub repo id (default: train.dino_model, else "
                   "facebook/dinov3-vitl16-pretrain-lvd1689m)")
    f.add_argument("--revision", metavar="REV", help="branch, tag or 40-hex commit (default: "
                   "train.dino_revision, else main; master on ModelScope)")
    _source(f)
    f.add_argument("--require-official", action="store_true", help="refuse (exit 8, nothing published) unless "
                   "the weights' sha256 is that of Meta's release, as pinned in 'dinov3-fetcher list' (default: "
                   "train.dino_require_official)")
    f.add_argument("--update", action="store_true", help="ask the Hub for the branch's current commit and fetch "
                   "what changed (a warm run otherwise makes no request)")
    f.add_argument("--repair", action="store_true", help="re-hash every file the manifest lists and re-download "
                   "only what is wrong (what 'verify --deep' reports)")
    f.add_argument("--dry-run", action="store_true", help="list what would be downloaded; write nothing")
    f.add_argument("--lock-timeout", type=float, metavar="SECONDS",
                   help="how long to wait for another fetcher on the same dino_root (default 3600)")
    f.add_argument("-v", "--verbose", action="store_true", help="one line per file fetched")
    f.add_argument("--progress", action="store_true", help="draw the progress bar even when stderr is not a terminal")
    _common(f)


def _list_parser(sub: Any) -> None:
    ls = sub.add_parser("list", help="the official DINOv3 checkpoints", epilog=_sub_epilog(
        "dinov3-fetcher list", "dinov3-fetcher list --json | jq -r '.variants[].repo_id'"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(ls)


def _verify_parser(sub: Any) -> None:
    v = sub.add_parser("verify", help="check dino_root offline (quick; --deep re-hashes every file)",
                       epilog=_sub_epilog("dinov3-fetcher verify --config config.json",
                                          "dinov3-fetcher verify --dino-root ./dinov3 --deep",
                                          "dinov3-fetcher verify --dino-root ./dinov3 --load --device cuda"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _where(v)
    v.add_argument("--deep", action="store_true", help="re-hash every file against the manifest's sha256")
    v.add_argument("--load", action="store_true", help="also load the model with transformers and run one "
                   "forward pass (needs the [load] extra)")
    v.add_argument("--device", default="cpu", help="device for --load (default cpu)")
    _common(v)


def _info_parser(sub: Any) -> None:
    i = sub.add_parser("info", help="what dino_root holds and whether it matches the config",
                       epilog=_sub_epilog("dinov3-fetcher info --config config.json",
                                          "dinov3-fetcher info --dino-root ./dinov3 --json"),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _where(i)
    i.add_argument("--model", metavar="REPO_ID", help="the model to compare against")
    i.add_argument("--revision", metavar="REV", help="the revision to compare against")
    _source(i)
    _common(i)


def _argv(argv: Sequence[str] | None) -> list[str]:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and (args[0] in COMMANDS or args[0] in ("-h", "--help", "--version")):
        return args
    return ["fetch", *args]


def _scrub(text: str) -> str:
    """Defence in depth: no code path prints a token, and the one scrubber (_secrets) makes sure none slips
    through, a signed URL's query (X-Amz-Signature, X-Amz-Credential...) included."""
    from . import _sources  # noqa: F401 - registers the sources' tokens with the scrubber
    from ._secrets import scrub

    return scrub(text)


def _emit_json(obj: dict[str, Any]) -> None:
    print(_scrub(json.dumps(obj, indent=2, sort_keys=False)), flush=True)


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dinov3-fetcher`` console script; returns the exit code."""
    words = _argv(argv)
    args = build_parser(words[0] if words[0] in COMMANDS else None).parse_args(words)
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    from . import _commands as commands

    handler: Callable[[argparse.Namespace], dict[str, Any]] = getattr(commands, f"cmd_{args.command}")
    try:
        result = handler(args)
    except FetcherError as exc:
        return _fail(args, type(exc).__name__, exc.message, exc.hint, exc.exit_code, exc)
    except KeyboardInterrupt as exc:
        return _fail(args, "FetchInterrupted", "interrupted", "run the same command again: it resumes", 130, exc)
    except Exception as exc:  # a bug, or an error we did not foresee: still one line, traceback on --debug
        return _fail(args, type(exc).__name__, f"unexpected error: {type(exc).__name__}: {exc}",
                     "run with --debug and report the traceback", EXIT_UNEXPECTED, exc)
    code = int(result.pop("exit_code", 0))
    if args.json:
        _emit_json({"ok": code == 0, **result})
    return code


def threading_is_main() -> bool:
    """Whether this is the main thread (only it may install the SIGTERM handler)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _fail(args: argparse.Namespace, kind: str, message: str, hint: str, code: int, exc: BaseException) -> int:
    if getattr(args, "debug", False):
        import traceback  # only for --debug

        sys.stderr.write(_scrub("".join(traceback.format_exception(exc))))
    if args.json:
        _emit_json({"ok": False, "error": {"type": kind, "message": message, "hint": hint, "exit_code": code}})
    line = f"{PROG}: error: {message}" + (f" -> {hint}" if hint else "")
    sys.stderr.write(_scrub(" ".join(line.split())) + "\n")
    sys.stderr.flush()
    return code
