"""What each CLI command does, as functions of parsed arguments that return a JSON-able result.

Human-readable output goes to stdout for the data a command exists to show (a path, a table) and to stderr
for messages; with --json only the returned dict is printed (by cli.py), as one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ._config import FetchRequest, resolve_request
from ._errors import VerificationError
from ._manifest import Manifest
from ._progress import Progress, human_bytes
from ._registry import check_official
from ._state import StateDir

__all__ = ["cmd_fetch", "cmd_info", "cmd_list", "cmd_verify"]


def _out(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def _request(args: argparse.Namespace) -> FetchRequest:
    return resolve_request(args.config, dino_root=args.dino_root, model=getattr(args, "model", None),
                           revision=getattr(args, "revision", None), source=getattr(args, "source", None),
                           require_official=getattr(args, "require_official", None))


def _root_only(args: argparse.Namespace) -> Path:
    return _request(args).dino_root  # raises ConfigError("no dino_root given") without --config/--dino-root


def cmd_fetch(args: argparse.Namespace) -> dict[str, Any]:
    """fetch (or --dry-run): the checkpoint's path on stdout, one summary line on stderr."""
    from ._fetch import fetch

    req = _request(args)
    if args.dry_run:
        from ._plan import dry_run

        dry = dry_run(req)
        rows = [f"{f.name:<40} {human_bytes(f.size):>10}  " +
                ("present" if f.reuse else f"{human_bytes(f.present)} partial" if f.present else "to download")
                for f in dry.files]
        _out(args, "\n".join(rows))
        _say(args, f"dry run: {dry.repo_id}@{dry.revision} is commit {dry.commit}; "
                   f"{human_bytes(dry.to_download)} to download into {dry.root}, {human_bytes(dry.free)} free; "
                   "nothing written")
        if dry.official_message:
            _say(args, f"{dry.repo_id}: by the listing's sha256, {dry.official_message.removeprefix('warning: ')}")
        return {"dry_run": True, **dry.to_dict()}
    progress = Progress(quiet=args.quiet, force=args.progress, verbose=args.verbose)
    result = fetch(req, update=args.update, progress=progress, lock_timeout=args.lock_timeout,
                   repair=getattr(args, "repair", False))
    if result.cached and result.requests_made:  # --update (or a repair from staged files): the Hub was asked
        _say(args, f"{result.repo_id}@{result.revision} already in {result.path}: up to date with "
                   f"{result.commit}, nothing downloaded")
    elif result.cached:
        _say(args, f"{result.repo_id}@{result.revision} ({result.commit[:12]}) already in {result.path} "
                   "(manifest and headers checked, no request made)")
    else:
        resumed = f", resumed {human_bytes(result.bytes_resumed)}" if result.bytes_resumed else ""
        _say(args, f"{result.repo_id}@{result.revision} ({result.commit[:12]}) ready in {result.path}: "
                   f"fetched {human_bytes(result.bytes_fetched)} in {result.seconds:.1f} s{resumed}, sha256 verified")
    if result.official_message:
        _say(args, f"{result.repo_id}: {result.official_message}")
    _out(args, str(result.path))
    return result.to_dict()


def cmd_list(args: argparse.Namespace) -> dict[str, Any]:
    """list: the official DINOv3 checkpoints from the registry."""
    from ._registry import VARIANTS, pins

    pinned = pins()
    header = (f"{'repo id':<48} {'arch':<22} {'params':>8} {'dim/heads/layers':>17} {'weights':>9}  "
              f"{'release sha256':<14} notes")
    rows = [header]
    for v in VARIANTS:
        pin = pinned.get(v.repo_id.lower())
        release = f"{pin.sha256[:8]}..." if pin is not None and pin.sha256 else "unknown"
        shape = (f"{v.hidden_size}/{v.heads}/{v.layers}" if v.family == "vit"
                 else "x".join(map(str, v.depths)))
        notes = ", ".join(n for n in ("default" if v.is_default else "", "sharded" if v.sharded else "",
                                      "SwiGLU" if v.gated_mlp else "") if n)
        rows.append(f"{v.repo_id:<48} {v.arch:<22} {v.params_m:>7.1f}M {shape:>17} "
                    f"{human_bytes(v.weights_bytes):>9}  {release:<14} {notes}")
    _out(args, "\n".join(rows))
    return {"variants": [{
        "repo_id": v.repo_id, "arch": v.arch, "family": v.family, "params_m": v.params_m,
        "weights_bytes": v.weights_bytes, "hidden_size": v.hidden_size or None, "heads": v.heads or None,
        "layers": v.layers or None, "intermediate_size": v.intermediate_size or None, "gated_mlp": v.gated_mlp,
        "depths": list(v.depths) or None, "hidden_sizes": list(v.hidden_sizes) or None,
        "default": v.is_default, "sharded": v.sharded,
        "release": (p.to_dict() if (p := pinned.get(v.repo_id.lower())) is not None else None)} for v in VARIANTS]}


def cmd_verify(args: argparse.Namespace) -> dict[str, Any]:
    """verify: offline checks (sizes and headers; --deep re-hashes; --load runs the model); exit 13 on a problem."""
    from ._verify import verify_dinov3

    root = _root_only(args)
    progress = Progress(quiet=args.quiet or not args.deep)
    report = verify_dinov3(root, deep=args.deep, progress=progress)
    for f in report.files:
        _say(args, f"{'ok  ' if f.ok else 'FAIL'} {f.name:<40} {human_bytes(f.size):>10}  {f.detail}")
    for p in report.problems:
        _say(args, f"FAIL {p}")
    m = report.manifest
    model = f"{m.repo_id}@{m.revision} ({m.commit[:12]})" if m else "unknown model"
    kind = "deep (sha256)" if args.deep else "quick (sizes and headers)"
    origin = f" from {m.source}" + (f" ({m.endpoint})" if m.endpoint else "") if m else ""
    check = check_official(m.repo_id, m.files) if m else None  # offline: the manifest's sha256s, checked above
    result: dict[str, Any] = {
        "path": str(root), "deep": args.deep, "repo_id": m.repo_id if m else None,
        "source": m.source if m else None, "endpoint": m.endpoint if m else None,
        "files": [{"name": f.name, "size": f.size, "ok": f.ok, "detail": f.detail} for f in report.files],
        "problems": [str(p) for p in report.problems], "seconds": round(report.seconds, 3),
        "official": check.official if check else None, "official_check": check.message if check else ""}
    load_info: dict[str, Any] | None = None
    if report.ok and args.load:
        from ._load import check_load

        load_info = check_load(root, device=args.device)
        _say(args, "load: " + ", ".join(f"{k} {v}" for k, v in load_info.items()))
        result["load"] = load_info
    if not root.is_dir():
        raise VerificationError(f"{root} {'is not a folder' if root.exists() else 'does not exist'}",
                                "check --dino-root (or train.dino_root in --config): verify checks a folder a fetch "
                                "filled")
    if not report.ok:
        first = report.problems[0] if report.problems else next(f for f in report.files if not f.ok)
        raise VerificationError(f"{root} failed {kind} verification of {model}: {first}",
                                f"run 'dinov3-fetcher --repair --dino-root {shlex.quote(str(root))}' (it re-hashes "
                                "every file and re-downloads only what is wrong)")
    _out(args, f"ok: {root} holds {model}{origin}, {len(report.files)} files passed {kind} verification "
               f"in {report.seconds:.1f} s")
    if check is not None and check.message:
        _out(args, f"{m.repo_id if m else root}: {check.message}")
    result["ok"] = True
    return result


def _when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "never"


def _pinned(m: Manifest) -> str:
    """What the revision resolved to, as a user can pin it (a source whose pinned id is a digest of its listing,
    as ModelScope's, records the site's own revision beside it)."""
    if not m.site_revision:
        return f"commit {m.commit}"
    return (f"{m.source} commit {m.site_revision}, what --revision takes; listing digest {m.commit}: this tool's "
            "id of the file list, not a revision of the site")


def cmd_info(args: argparse.Namespace) -> dict[str, Any]:
    """info: what dino_root holds and whether it is the requested checkpoint."""
    from ._validate import find_problems, why_not

    req = _request(args)  # raises ConfigError("no dino_root given") without --config/--dino-root
    root = req.dino_root
    m, damage = StateDir(root).manifest_or_damage()
    check = check_official(m.repo_id, m.files) if m else None
    problems = [str(p) for p in find_problems(root, m)] if root.is_dir() else [f"{root} does not exist"]
    why = why_not(root, req.model, req.revision, m)
    if why is None and m is not None and m.source != req.source:
        why = f"it came from {m.source}, not {req.source} (a fetch with --source {req.source} reuses equal files)"
    lines = [f"dino_root:  {root}"]
    if m is None and damage is not None:
        lines.append(f"model:      unknown: the manifest is damaged ({damage}); a fetch writes a new one")
    elif m is None:
        lines.append("model:      none recorded (no manifest: not fetched by this tool, or never fetched)")
    else:
        lines += [
            f"model:      {m.repo_id}",
            f"revision:   {m.revision} ({_pinned(m)})",
            f"fetched:    {_when(m.fetched_at)} by dinov3-fetcher {m.tool_version} from {m.source}"
            + (f" ({m.endpoint})" if m.endpoint else ""),
            f"verified:   quick {_when(m.verified_at)}, deep {_when(m.verified_deep_at)}",
            "official:   " + (check.message if check and check.message else "unknown (no pinned release to compare)")
            .removeprefix("warning: "),
            "files:",
            *(f"  {n:<40} {human_bytes(r.size):>10}  sha256 {r.sha256[:16]}..." for n, r in sorted(m.files.items())),
            f"total:      {human_bytes(sum(r.size for r in m.files.values()))}",
        ]
    left = _leftovers(StateDir(root))
    lines.append("left over:  " + (f"{len(left)} partial or staged download folder(s) of other fetchers, "
                                   f"{human_bytes(sum(left.values()))} (a fetch removes each once its owner is gone: "
                                   "a dead process here, or a heartbeat that stopped on another host)" if left else
                                   "nothing"))
    lines.append(f"requested:  {req.model}@{req.revision} from {req.source} -> " + ("matches, valid" if why is None else
                                                                  f"does NOT match: {why}"))
    _out(args, "\n".join(lines))
    return {
        "path": str(root), "repo_id": m.repo_id if m else None, "revision": m.revision if m else None,
        "commit": m.commit if m else None, "site_revision": (m.site_revision or None) if m else None,
        "fetched_at": m.fetched_at if m else None,
        "verified_at": m.verified_at if m else None, "verified_deep_at": m.verified_deep_at if m else None,
        "tool_version": m.tool_version if m else None,
        "files": {n: {"size": r.size, "sha256": r.sha256} for n, r in sorted(m.files.items())} if m else {},
        "requested": {"repo_id": req.model, "revision": req.revision, "source": req.source}, "matches": why is None,
        "problems": problems, "source": m.source if m else None, "endpoint": m.endpoint if m else None,
        "official": m.official if m else None, "official_check": check.to_dict() if check else None,
        "manifest_damage": damage, "leftovers": {"count": len(left), "bytes": sum(left.values()), "folders": left},
    }


def _leftovers(state: StateDir) -> dict[str, int]:
    """The state folder's partial and staged folders (no fetcher of this process runs): path -> bytes."""
    out = {}
    for kind, folder in state.leftovers():
        total = 0
        for base, _, names in os.walk(folder):  # links are not followed
            for name in names:
                with contextlib.suppress(OSError):
                    total += (Path(base) / name).lstat().st_size
        out[f"{kind}/{folder.name}"] = total
    return out
