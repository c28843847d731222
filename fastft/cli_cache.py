"""``fastft cache ls|info|verify|rm|prune``: the disk caches, for people (and ``--json``).

Built on :mod:`fastft.cache`'s public functions; ``--cache-dir`` and ``--json`` are accepted
before the subcommand and after it.
"""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["add_cache_parser"]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _human_age(created: float | None) -> str:
    if not created:
        return "?"
    seconds = max(0.0, time.time() - float(created))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _cmd_cache(args: argparse.Namespace) -> int:
    from fastft import cache

    handler = {
        "ls": _cache_ls,
        "info": _cache_info,
        "verify": _cache_verify,
        "rm": _cache_rm,
        "prune": _cache_prune,
    }[args.cache_cmd]
    return handler(cache, args)


def _when(t: float | None) -> str:
    if not t:
        return "?"
    return f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(float(t)))} ({_human_age(t)})"


def _shapes(e: dict) -> str:
    from fastft.cache.telemetry import shape_text

    return shape_text(e["num_rows"], e["num_views"], [t["shape"] for t in e["taps"]])


def _cache_ls(cache, args: argparse.Namespace) -> int:
    entries = cache.list_caches(args.cache_dir)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    if not entries:
        print(f"no caches in {args.cache_dir or cache.default_cache_dir()}")
        return 0
    head = ("fingerprint", "dtype", "size", "status", "last used", "rows x dims")
    print("{:<18} {:<5} {:>10} {:<10} {:<14} {}".format(*head))
    for e in entries:
        status = str(e.get("status") or "?")  # a damaged manifest may hold nulls
        if status == "building" and not e.get("being_built"):
            status = "partial"  # an interrupted build: building it again resumes
        if status == "complete" and e.get("reusable") is False:
            status = "once"  # a key that could not see everything: never reused, safe to remove
        shapes = _shapes(e) if "taps" in e else e.get("error", "")
        print(
            f"{str(e.get('fingerprint') or '?')[:16]:<18} {str(e.get('dtype') or '?'):<5} "
            f"{_human_bytes(e.get('disk_bytes') or 0):>10} {status:<10} "
            f"{_human_age(e.get('last_used')):<14} {shapes}"
        )
    return 0


def _precision(info: dict) -> str:
    """The autocast the frozen pass ran under (extract_amp), from the key's dtype part."""
    part = str((info.get("parts") or {}).get("dtype", ""))
    _, _, under = part.partition(",prefix under ")
    return under or "fp32"


def _cache_info(cache, args: argparse.Namespace) -> int:
    info = cache.info(args.cache, args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    about = info.get("describes") or {}
    chunks = f"{info['committed_chunks']} chunk(s) committed"
    built = info.get("telemetry") or {}
    rows = [
        ("fingerprint", info["fingerprint"]),
        ("path", info["path"]),
        ("model", about.get("model", "not recorded")),
        ("data", about.get("data", f"{info['num_rows']} samples")),
        (
            "complete",
            "yes"
            if info["complete"]
            else f"no ({chunks}; being built now)"
            if info.get("being_built")
            else f"no ({chunks}; building it again resumes)",
        ),
        ("reusable", "yes" if info["reusable"] else "no (built for one use only)"),
        ("dtype", info["dtype"]),
        ("frozen pass", _precision(info)),
        ("pool", info["pool"]),
        ("rows x dims", _shapes(info)),
        *(
            (
                f"  {t['name']}",
                f"{t['dim']} values per row, shape {tuple(t['shape'])}, {t['dtype']}",
            )
            for t in info["taps"]
        ),
        ("size on disk", _human_bytes(info.get("disk_bytes", 0))),
        ("created", _when(info.get("created"))),
        ("last used", _when(info.get("last_used"))),
    ]
    if built:
        rows.append(("built", f"in {built.get('build_seconds', 0):.1f} s ({built.get('reason')})"))
    for key, value in rows:
        print(f"{key:>13}: {value}")
    return 0


def _cache_verify(cache, args: argparse.Namespace) -> int:
    result = cache.verify(args.cache, args.cache_dir)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif result["complete"]:
        print(
            f"ok: cache {result['fingerprint'][:12]} is complete and intact "
            f"({result['chunks']} chunk(s), every checksum matches) at {result['path']}"
        )
    else:
        print(
            f"ok: cache {result['fingerprint'][:12]} is intact but partial: {result['chunks']} "
            f"chunk(s) committed, every checksum matches; building it again resumes "
            f"({result['path']})"
        )
    return 0


def _cache_rm(cache, args: argparse.Namespace) -> int:
    removed = cache.remove(args.cache, args.cache_dir)
    print(json.dumps({"removed": str(removed)}) if args.json else f"removed {removed}")
    return 0


def _cache_prune(cache, args: argparse.Namespace) -> int:
    done = cache.prune(
        args.cache_dir,
        older_than_days=args.older_than,
        max_size=args.max_size,
        dry_run=args.dry_run,
    )
    if args.json:
        print(json.dumps(done, indent=2, default=str))
        return 0
    root = args.cache_dir or cache.default_cache_dir()
    if not done:
        print(f"nothing to prune in {root}")
        return 0
    for e in done:
        what = f"{e['fingerprint'][:12]} ({_human_bytes(e['disk_bytes'])}): {e['why']}"
        if "skipped" in e:
            print(f"kept {what}; not removed: {e['skipped']}")
        else:
            print(f"{'removed' if e['removed'] else 'would remove'} {what}")
    gone = [e for e in done if e["removed"] or (args.dry_run and "skipped" not in e)]
    freed = _human_bytes(sum(e["disk_bytes"] for e in gone))
    verb = "would free" if args.dry_run else "freed"
    print(f"{len(gone)} cache(s) {'to remove' if args.dry_run else 'removed'}, {verb} {freed}")
    return 0


def _cache_options(parser: argparse.ArgumentParser, *, after: bool) -> None:
    """``--cache-dir`` and ``--json``, accepted before the cache subcommand and after it (the
    subcommand's copies default to SUPPRESS, so they never undo one given before)."""
    parser.add_argument(
        "--cache-dir",
        default=argparse.SUPPRESS if after else None,
        help="the caches' folder (default $FASTFT_CACHE_DIR or ~/.cache/fastft)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if after else False,
        help="machine-readable output",
    )


def add_cache_parser(sub) -> None:
    """The ``cache`` command and its subcommands, on the ``fastft`` parser's ``sub``."""
    c = sub.add_parser(
        "cache",
        help="list, inspect, verify, remove or prune disk caches",
        description="Disk caches by fingerprint (or a unique prefix of one). Options go before "
        "or after the subcommand.",
    )
    _cache_options(c, after=False)
    csub = c.add_subparsers(dest="cache_cmd", required=True, metavar="COMMAND")
    _cache_options(csub.add_parser("ls", help="list caches, newest first"), after=True)
    for name, text in (
        ("info", "show one cache: status, model and data, dtype, shapes, size, times"),
        ("verify", "check its file sizes and every checksum"),
        ("rm", "delete a cache (only fastft's own folders, never while it is built)"),
    ):
        q = csub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        q.add_argument(
            "cache",
            help="fingerprint (or a unique prefix of one) in the cache dir, or a folder "
            "written as a path (./name, /abs/path)",
        )
        _cache_options(q, after=True)
    pr = csub.add_parser(
        "prune",
        help="remove superseded caches (and, on request, old or least recently used ones)",
        description="Remove the caches a newer cache of the same model and data supersedes "
        "(one whose key differs only in the frozen weights: the model was trained further, or "
        "another checkpoint loaded) and those built "
        "for one use only; with --older-than and --max-size, also old or least recently used "
        "ones. Removal follows `cache rm`'s rules: only fastft's own folders, never through "
        "a link, never a cache being built.",
    )
    pr.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        default=None,
        help="also remove caches not built or reused for DAYS days",
    )
    pr.add_argument(
        "--max-size",
        metavar="SIZE",
        default=None,
        help="then remove the least recently used until all caches take at most SIZE "
        "(e.g. 20G, 500MB, 2GiB)",
    )
    pr.add_argument(
        "--dry-run", action="store_true", help="say what would be removed; remove nothing"
    )
    _cache_options(pr, after=True)
    c.set_defaults(func=_cmd_cache)
