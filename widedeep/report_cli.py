"""``widedeep report``: run the report's sweeps and write ``results/`` (see analysis.report)."""

from __future__ import annotations

import argparse
import os

from widedeep.errors import UserError

HELP = "run the report's sweeps and write results/ (README, tables, figures)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=("tiny", "quick", "full"), default=None,
                   help="how much training: quick (default, < 15 min on 2 CPU cores), "
                        "full (more seeds, depths, epochs), tiny (for tests)")
    p.add_argument("--full", action="store_true", help="same as --profile full")
    p.add_argument("--out", default="results", help="output folder (default results)")
    p.add_argument("--storage", default=None,
                   help="sweep storage URL (default sqlite:///OUT/report.sqlite3); a "
                        "PostgreSQL URL lets several machines share the work")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per sweep (default: CPU count, at most 4)")
    p.add_argument("--engine", choices=("auto", "plain"), default="auto",
                   help="auto (default: the batched engine where configs allow) or plain "
                        "(every net on the plain loop, in studies of their own)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _profile(args: argparse.Namespace) -> str:
    if args.full and args.profile not in (None, "full"):
        raise UserError(f"--full contradicts --profile {args.profile}")
    return "full" if args.full else (args.profile or "quick")


def run(args: argparse.Namespace) -> int:
    workers = args.workers if args.workers is not None else min(os.cpu_count() or 1, 4)
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got workers={workers}")
    os.environ.setdefault("MPLBACKEND", "Agg")  # headless, before matplotlib is imported
    from analysis.report import build  # deferred: pandas, seaborn and matplotlib are slow

    readme = build(profile=_profile(args), out=args.out, storage=args.storage,
                   workers=workers, progress=not args.quiet, engine=args.engine)
    print(f"report: {readme}")
    return 0
