"""``widedeep sweep SPEC.toml``: run a grid sweep into Optuna storage, resumable and parallel."""

from __future__ import annotations

import argparse

HELP = "run a grid sweep (every grid point x seed once; resumable, parallel)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="TOML spec with [sweep], [fixed] and [grid] tables")
    p.add_argument("--storage", help="Optuna storage URL (default "
                   "sqlite:///results/sweeps.sqlite3); a PostgreSQL URL shares the sweep "
                   "between machines")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--export", metavar="FILE.csv", help="write all trials as one CSV table")
    p.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                   help="seconds without a heartbeat before a running trial counts as lost "
                   "and is run again (default 60)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import optuna

    from widedeep import sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = sweep.load_spec(args.spec)
    if args.export:
        sweep.check_export(args.export)
    url = args.storage or sweep.default_storage(spec)
    counts = sweep.run_sweep(spec, storage=url, workers=args.workers,
                             progress=not args.quiet, grace_s=args.grace)
    print(f"{spec.name}: {counts['done']}/{counts['total']} trials done "
          f"({counts['ran_now']} run now, {counts['diverged']} diverged, "
          f"{counts['failed']} failed) in {url}")
    if args.export:
        print(f"wrote {sweep.export_csv(spec, args.export, storage=url)}")
    return 0 if counts["done"] + counts["failed"] == counts["total"] else 1

