"""``widedeep search``: TPE search for the lowest cross-validated log-loss, with baselines."""

from __future__ import annotations

import argparse

HELP = "search architectures and training options for the lowest CV log-loss (exercise 7-1)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="diabetes", help="dataset (default diabetes)")
    p.add_argument("--split", default="cv:5", help="cv:K (default cv:5) or holdout")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds and of every trial")
    p.add_argument("--trials", type=int, default=50,
                   help="finished trials the study should have (default 50; resumable)")
    p.add_argument("--timeout", type=float, help="stop starting trials after SECONDS")
    p.add_argument("--storage", help="Optuna storage URL (default "
                   "sqlite:///results/search.sqlite3); PostgreSQL shares it between machines")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--study", help="study name (default search-DATASET-SPLIT-seedN)")
    p.add_argument("--max-depth", type=int, default=32, help="deepest net tried (default 32)")
    p.add_argument("--max-epochs", type=int, default=300,
                   help="most epochs per trial; early stopping may end sooner (default 300)")
    p.add_argument("--top", type=int, default=10, help="leaderboard rows (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--engine", choices=("auto", "plain"), default="auto",
                   help="auto (default: the batched engine where a trial's folds allow) or "
                        "plain (every trial on the plain loop)")


def _pm(mean, std) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _row(label: str, e: dict) -> str:
    return (f"{label:<26} {_pm(e['test_loss'], e['test_loss_std']):>17} "
            f"{_pm(e['test_accuracy'], e['test_accuracy_std']):>17} "
            f"{_pm(e['test_auc'], e['test_auc_std']):>17}")


def format_results(r: dict) -> str:
    """The leaderboard, the baselines beside it, the best command, the best deep net."""
    from widedeep.search import paired_with_baseline

    lines = [f"{r['study']}: {r['n_trials']} trials on {r['dataset']}, split {r['split']}, "
             f"seed {r['seed']}",
             f"{'':<26} {'CV log-loss':>17} {'accuracy':>17} {'AUC':>17}"]
    for e in r["leaderboard"]:
        o = e["options"]
        label = f"#{e['number']} {o['arch']} {o['activation']} {o['depth']}x{o['width']}"
        lines.append(_row(label, e))
    lines.append("baselines (same folds):")
    lines += [_row(f"  {b['name']}", b) for b in r["baselines"]]
    if r["best"] is not None:
        paired = paired_with_baseline(r["best"], r["baselines"])
        lines += ["best config:", "  " + r["best"]["command"]] + ([paired] if paired else [])
    deep = r["best_deep"]
    lines.append("best net deeper than 10 layers: " + (
        f"#{deep['number']} (depth {deep['depth']}), CV log-loss "
        f"{_pm(deep['test_loss'], deep['test_loss_std'])}\n  {deep['command']}"
        if deep else "none tried yet"))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from widedeep.search import run_search, search_results

    r = run_search(study=args.study, dataset=args.dataset, split=args.split, seed=args.seed,
                   trials=args.trials, timeout=args.timeout, storage=args.storage,
                   workers=args.workers, max_depth=args.max_depth, max_epochs=args.max_epochs,
                   engine=args.engine, progress=not args.quiet)
    if args.top != 10:
        r = search_results(r["study"], r["storage"], top=args.top)
    print(format_results(r))
    return 0
