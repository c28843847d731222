"""The ``fastft`` command: ``demo``, ``bench``, ``train``, ``cache ls|info|verify|rm|prune``,
``--version``.

Built on the public API only. Errors of fastft's own (``FastFTError``) are printed as one
line with what to do, exit status 2; nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import fastft
from fastft.cli_cache import add_cache_parser
from fastft.errors import FastFTError
from fastft.probing.cli import add_probe_parser


# ---------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.task == "digits":
        from fastft.bench.demo import digits

        report = digits.run(digits.DigitsSettings(epochs=args.epochs or 10, verbose=not args.quiet))
        print(digits.table(report))
        paths = digits.write(report, out)
    else:
        from fastft.bench.demo import bbc
        from fastft.bench.demo import report as rep

        settings = bbc.DemoSettings(
            epochs=args.epochs or 10,
            naive_epochs=args.naive_epochs,
            full=args.full,
            max_seq_length=args.max_seq_length,
            per_class_limit=args.limit,
            cache_dtype=args.cache_dtype,
            extract_amp=args.extract_amp,
            skip_config_b=args.skip_config_b,
            verbose=not args.quiet,
        )
        report = bbc.run(settings)
        print()
        print(rep.table(report))
        how = "measured" if report["speedup_measured"] else "naive projected from measured epochs"
        print(
            f"\ntraining speed-up vs naive: {report['speedup_vs_naive']:.1f}x ({how}); "
            f"fastft / (one frozen pass + {report['epochs']} head epochs) = "
            f"{report['fastft_vs_ideal']:.2f}"
        )
        paths = rep.write(report, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


# ---------------------------------------------------------------------------- bench
# Where benchmark runs write by default: git-ignored in a checkout, so that no run
# rewrites the figures committed in benchmarks/results (pass --out to update those).
DEFAULT_RESULTS = Path(".benchmarks") / "results"


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.suite:  # --kernels / --suite: the pytest-benchmark suites
        return _run_suites(args.suite, args.out, args.select)
    if args.select:
        raise FastFTError(
            "-k selects benchmarks of the pytest suites: use it with --kernels/--suite."
        )
    out = args.out or DEFAULT_RESULTS
    if args.unfreeze:
        return _bench_unfreeze(args, out)
    from fastft.bench import e2e as bench

    settings = bench.BenchSettings(
        tasks=tuple(args.tasks),
        epochs=tuple(args.epochs),
        dtypes=tuple(args.dtypes),
        tiers=tuple(args.tiers),
        extract_amps=tuple(args.extract_amp),
        quick=args.quick,
        max_seq_length=args.max_seq_length,
        per_class_limit=args.limit,
        verbose=not args.quiet,
    )
    rows = bench.run(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bench.table(rows))
    paths = bench.write(rows, settings, out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _bench_unfreeze(args: argparse.Namespace, out: str | Path) -> int:
    from fastft.bench import unfreeze as bu

    settings = bu.UnfreezeSettings(
        quick=args.quick,
        max_seq_length=args.max_seq_length,
        per_class_limit=args.limit,
        verbose=not args.quiet,
    )
    result = bu.run(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(bu.table(result, settings))
    print(f"wrote {bu.write(result, settings, out)}")
    return 0


def _run_suites(suite: list[str], out: str | None, select: str | None) -> int:
    """``pytest benchmarks`` (or some of its suites) with the results written into ``out``.

    Never rewrites tracked files: the results go to ``out`` (default .benchmarks/results
    in the checkout, git-ignored), and docs/benchmarks.md is rendered from them only by
    the explicit ``benchmarks/render_benchmarks.py RESULTS_DIR`` (``make bench`` does both).
    """
    checkout = Path(__file__).resolve().parent.parent
    root = checkout / "benchmarks"
    if not root.is_dir():
        raise FastFTError(
            f"no benchmarks folder at {root}: run `fastft bench --kernels` from a source checkout."
        )
    results = Path(out).resolve() if out else checkout / DEFAULT_RESULTS
    suites = [str(root)] if "all" in suite else [str(root / f"bench_{s}.py") for s in suite]
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *suites,
        "--benchmark-only",
        "--results-dir",
        str(results),
        "-q",
        "-p",
        "no:cacheprovider",
        *(["-k", select] if select else []),
    ]
    code = subprocess.call(cmd)
    if code == 5:  # pytest's "no tests collected"
        print(f"fastft: no benchmark selected by {' '.join(cmd[3:])}", file=sys.stderr)
    if code == 0:
        print(f"results in {results}")
        print(
            "to copy them into docs/benchmarks.md: "
            f"python {root / 'render_benchmarks.py'} {results}"
        )
    return code


# ---------------------------------------------------------------------------- cache
def _cmd_train(args: argparse.Namespace) -> int:
    from fastft import jobs

    metrics = jobs.run_file(args.config)  # factories import from the config's folder, then cwd
    print(json.dumps(metrics, indent=2))
    return 0


def _csv_of(choices: list[str] | None, kind=str):
    """An argparse type: a comma-separated list of ``kind`` values, each one of ``choices``."""

    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = [kind(t) for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of {kind.__name__}"
            ) from None
        bad = [
            v
            for v in values
            if (choices is not None and v not in choices) or (kind is int and v < 1)
        ]
        if not values or bad:
            allowed = ", ".join(choices) if choices else "positive integers"
            raise argparse.ArgumentTypeError(f"{text!r}: use a comma-separated list of {allowed}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastft", description="Fine-tune pretrained networks, frozen layers run once."
    )
    p.add_argument("--version", action="version", version=f"fastft {fastft.__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="naive fine-tuning vs fastft on a real pretrained model and real data"
    )
    d.add_argument(
        "--task",
        choices=["bbc", "digits"],
        default="bbc",
        help="bbc: all-MiniLM-L6-v2 on BBC News (default); digits: a CNN from digits 0-4 to 5-9",
    )
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 10)")
    d.add_argument(
        "--naive-epochs",
        type=int,
        default=2,
        help="epochs of the naive loop actually run (default 2)",
    )
    d.add_argument("--full", action="store_true", help="run the naive loop for all epochs (slow)")
    d.add_argument("--max-seq-length", type=int, default=128)
    d.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="fp16")
    d.add_argument(
        "--extract-amp",
        choices=["fp32", "bf16", "auto"],
        default="auto",
        help="fastft's frozen pass (default auto: bf16 where the CPU/GPU computes it natively, "
        "else fp32); the naive loop is timed in fp32 and, where bf16 is native, in bf16 too",
    )
    d.add_argument("--limit", type=int, default=None, help="articles per class (quick runs)")
    d.add_argument(
        "--skip-config-b", action="store_true", help="skip the configuration with layers removed"
    )
    d.add_argument("--out", default="fastft-demo", help="output folder (default ./fastft-demo)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "bench",
        help=(
            "end-to-end naive vs fastft (epochs x cache dtypes x tiers); "
            "--kernels: the pytest suites"
        ),
        description=(
            "End-to-end naive vs fastft on MiniLM/BBC and a CPU CNN, written to "
            "OUT/e2e.{csv,json,png} (OUT: --out, default .benchmarks/results). The default run "
            "takes about 10 minutes on a 2-core CPU; --quick 2-4. --kernels / --suite run the "
            "pytest-benchmark suites of a source checkout instead (results into OUT, default "
            "the checkout's .benchmarks/results)."
        ),
    )
    b.add_argument(
        "--quick", action="store_true", help="250 articles at 64 tokens (writes e2e_quick.*)"
    )
    b.add_argument(
        "--tasks", type=_csv_of(["bbc", "cnn"]), default=["bbc", "cnn"], help="comma list (bbc,cnn)"
    )
    b.add_argument(
        "--epochs", type=_csv_of(None, int), default=[1, 3, 10], help="comma list (default 1,3,10)"
    )
    b.add_argument(
        "--dtypes",
        type=_csv_of(["fp32", "bf16", "fp16", "int8"]),
        default=["fp32", "fp16", "int8"],
        help="comma list of cache dtypes (default fp32,fp16,int8)",
    )
    b.add_argument(
        "--tiers",
        type=_csv_of(["host", "disk", "device"]),
        default=["host", "disk"],
        help="comma list of cache tiers (default host,disk)",
    )
    b.add_argument(
        "--extract-amp",
        type=_csv_of(["fp32", "bf16", "auto"]),
        default=["auto"],
        help="comma list of frozen-pass precisions, one fastft run each (default auto: bf16 "
        "where the CPU/GPU computes it natively, else fp32); e.g. fp32,auto",
    )
    b.add_argument(
        "--max-seq-length",
        type=int,
        default=None,
        help="MiniLM tokens (default 128; 64 with --quick)",
    )
    b.add_argument(
        "--limit", type=int, default=None, help="articles per class (default all; 50 with --quick)"
    )
    b.add_argument(
        "--out",
        "--results-dir",
        dest="out",
        default=None,
        help="results folder (default .benchmarks/results; the suites': the checkout's); "
        "benchmarks/results holds the committed figures, written only when named here",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.add_argument(
        "--unfreeze",
        action="store_true",
        help="progressive unfreezing instead: 5 head epochs, then MiniLM's top layer for 3 "
        "(writes unfreeze[_quick].json; about 7 minutes, --quick about 1)",
    )
    b.add_argument(
        "--suite",
        action="append",
        choices=["kernels", "cache", "trainer", "distributed", "gpu", "probe", "extract"],
        help="run this pytest-benchmark suite instead (repeatable; gpu is skipped without CUDA)",
    )
    b.add_argument(
        "--kernels",
        dest="suite",
        action="store_const",
        const=["all"],
        help="run every pytest-benchmark suite (pytest benchmarks --benchmark-only) instead",
    )
    b.add_argument(
        "-k",
        dest="select",
        metavar="EXPR",
        default=None,
        help="with --kernels/--suite: only the benchmarks whose names match EXPR (pytest -k)",
    )
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser(
        "train",
        help="run a fine-tuning job from a JSON/YAML config (works under torchrun)",
        description="Run a job described by CONFIG: model and data factories "
        "('package.module:function'), surgery, FineTuner and fit settings, output folder. "
        "Factories are imported from the config's folder first, then the current folder. "
        "See fastft/jobs.py for the format. A job config is code: the functions it names "
        "are imported and called, so run only configs you trust.",
    )
    t.add_argument("config", help="path to the .json (or .yaml) config")
    t.set_defaults(func=_cmd_train)

    add_cache_parser(sub)
    add_probe_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastFTError as exc:
        print(f"fastft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
