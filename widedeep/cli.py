"""The ``widedeep`` command line: ``train``, ``activations``, ``datasets`` and the commands of
other modules listed in ``SUBCOMMANDS``.

A user error exits with status 2 and one ``error: ...`` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import re
import signal
import sys
import threading

from widedeep.errors import UserError

DESCRIPTION = ("Train, sweep, search and benchmark PyTorch MLPs on tabular classification, "
               "and write the report (see README.md).")

# Subcommands that live in their own modules: each exposes add_arguments(parser) and run(args).
SUBCOMMANDS: dict[str, str] = {
    "sweep": "widedeep.sweep_cli", "search": "widedeep.search_cli", "report": "widedeep.report_cli",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage first
        raise UserError(message)


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every ``widedeep train`` option; flags left out stay None (= default or preset)."""
    g = p.add_argument_group("data")
    g.add_argument("--preset", help="start from a named config: lecture")
    g.add_argument("--dataset", help="diabetes (default), breast_cancer, wine, iris, digits")
    g.add_argument("--csv", help="a CSV file (header row; .csv or .csv.gz) instead of --dataset")
    g.add_argument("--target", help="the class column of --csv")
    g.add_argument("--split", help="none | holdout (default) | cv:K")
    g.add_argument("--test-size", type=float, help="holdout test share (default 0.2)")
    g.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="z-score features, fit on training rows (default on; off in lecture)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", help="mlp (default) | widedeep")
    g.add_argument("--cross", action="store_true", default=None,
                   help="widedeep: add pairwise cross-product features to the wide part")
    g.add_argument("--depth", type=int, help="number of hidden layers (with --width)")
    g.add_argument("--width", type=int, help="units per hidden layer (with --depth)")
    g.add_argument("--widths", help="hidden widths, comma-separated, e.g. 6,4 (default)")
    g.add_argument("--activation", help="see `widedeep activations` (default sigmoid)")
    g.add_argument("--init", help="default | xavier | kaiming | lecun")
    g.add_argument("--norm", help="none | batch | layer")
    g.add_argument("--residual", action="store_true", default=None,
                   help="identity shortcut around blocks of equal width")
    g.add_argument("--dropout", type=float, help="dropout rate (alpha dropout with selu)")
    g = p.add_argument_group("training")
    g.add_argument("--optimizer", help="sgd (default) | adam | adamw")
    g.add_argument("--lr", type=float, help="learning rate (default 0.1)")
    g.add_argument("--momentum", type=float, help="sgd momentum (default 0)")
    g.add_argument("--weight-decay", type=float, help="L2 weight decay (default 0)")
    g.add_argument("--epochs", type=int, help="epochs (default 100)")
    g.add_argument("--batch-size", help="mini-batch size, or 'full' (default)")
    g.add_argument("--patience", type=int, help="early stopping on a 15%% validation split")
    g.add_argument("--seed", type=int, help="seed for splits, init and batch order (default 0)")
    g.add_argument("--device", help="auto (default) | cpu | cuda")
    g.add_argument("--engine", help="auto (default) | plain | batched")
    g.add_argument("--threads", type=int,
                   help="CPU threads (default: 1 for small nets, torch's default for large)")
    g.add_argument("--probe-epochs", help="also probe gradients/activations at these epochs")


TRAIN_OPTION_DESTS = (
    "preset dataset csv target split test_size standardize arch cross depth width widths "
    "activation init norm residual dropout optimizer lr momentum weight_decay epochs "
    "batch_size patience seed device engine threads probe_epochs"
).split()


def options_from_args(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in TRAIN_OPTION_DESTS}
    if options["csv"] is not None and options["dataset"] is not None:
        raise UserError(f"give --dataset or --csv, not both (got --dataset {options['dataset']}"
                        f" and --csv {options['csv']})")
    bs = options["batch_size"]
    if bs is not None and bs != "full":
        try:
            options["batch_size"] = int(bs)
        except ValueError:
            raise UserError(f"--batch-size must be an integer or 'full', got {bs!r}") from None
    return options


def cmd_train(args: argparse.Namespace) -> int:
    from widedeep.batched_run import plan, run_group
    from widedeep.checkpoint import Checkpoint
    from widedeep.config import make_config
    from widedeep.env import environment
    from widedeep.records import check_run_folder, write_run_folder
    from widedeep.run import resolve_device, run_experiment

    config = make_config(**options_from_args(args))
    if args.resume and not args.out:
        raise UserError("--resume needs --out: the run folder whose checkpoint to continue")
    if args.out:
        check_run_folder(args.out)
    progress = not args.quiet and sys.stderr.isatty()
    # --engine: batched where forced or where folds train together, else the plain loop
    reason = plan([config])[0]
    checkpoint = None
    if args.out:  # a checkpoint beside --out, of the engine that trains the run
        checkpoint = Checkpoint.start(args.out, config.to_dict(), resume=args.resume,
                                      engine="plain" if reason else "batched")
    if reason is None:
        (result,) = run_group([config], checkpoint=checkpoint)
    else:
        result = run_experiment(config, progress=progress, checkpoint=checkpoint)
        result.summary.update(engine="plain", engine_reason=reason)
    if args.out:
        write_run_folder(args.out, config=config.to_dict(), summary=result.summary,
                         history=result.history, probes=result.probes,
                         environment=environment(resolve_device(config.device)))
        if checkpoint is not None:
            checkpoint.remove()
    if args.json:
        print(json.dumps(result.summary))
    else:
        print(format_summary(result.summary))
        if args.out:
            print(f"run folder: {args.out}")
    return 0


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_summary(s: dict) -> str:
    """A short human-readable report of a run summary."""
    def std(k):
        return f" ± {_fmt(s[k + '_std'])}" if s.get(k + "_std") is not None else ""

    lines = [
        f"{s['dataset']}: {s['arch']} {s['activation']} widths={s['widths']} init={s['init']}"
        f" | {s['optimizer']} lr={s['lr']} epochs={s['epochs_run']}/{s['epochs']}"
        f" seed={s['seed']} on {s['device']}",
        f"split {s['split']}: {s['n_train']} train / {s['n_test']} test rows"
        f" (metrics on {s['evaluated_on']})",
        f"final train loss {_fmt(s['final_train_loss'])}"
        f"   base-rate loss {_fmt(s['base_rate_loss'])}"
        f"   left plateau at epoch {s['epochs_to_leave_plateau'] or 'never'}",
        f"test loss {_fmt(s['test_loss'])}{std('test_loss')}"
        f"   accuracy {_fmt(s['test_accuracy'])}{std('test_accuracy')}"
        f"   AUC {_fmt(s['test_auc'])}",
        f"gradient norm first/last layer at init: {_fmt(s['grad_ratio_init'], 3)}"
        f"   after training: {_fmt(s['grad_ratio_final'], 3)}",
        "confusion matrix (rows = true, columns = predicted):",
    ]
    width = max(len(c) for c in s["class_names"])
    for name, row in zip(s["class_names"], s["confusion_matrix"], strict=True):
        lines.append(f"  {name:>{width}}  " + " ".join(f"{v:6d}" for v in row))
    if s["diverged"]:
        lines.append(f"DIVERGED: {s['diverged_reason']}")
    lines.append(f"{s['seconds']:.2f} s")
    return "\n".join(lines)


def cmd_activations(args: argparse.Namespace) -> int:
    from widedeep.activations import get_activation, list_activations

    for name in list_activations():
        spec = get_activation(name)
        print(f"{name:12s} gain {spec.gain():.3f}  {spec.doc}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from widedeep.data import list_datasets

    for name in list_datasets():
        print(name)
    print("or your own: --csv PATH --target COLUMN")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="widedeep", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("train", help="train and evaluate one configuration")
    add_train_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--out", help="write a run folder (config, report, history, probes); "
                   "training is checkpointed beside it, in OUT.checkpoint.pt")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run of --out from its checkpoint (give the "
                        "same options)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    sub.add_parser("activations", help="list activations").set_defaults(func=cmd_activations)
    sub.add_parser("datasets", help="list datasets").set_defaults(func=cmd_datasets)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def _terminated(signum, frame):
    raise KeyboardInterrupt  # as Ctrl-C: worker processes are stopped, their claims given back


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation (a net too big for this machine or its GPU), as Python or torch
    reports it."""
    import torch

    return isinstance(e, MemoryError | torch.OutOfMemoryError) or (
        "can't allocate memory" in str(e))


def _memory_message(e: BaseException) -> str:
    """What did not fit, in a few words; else the error's first line."""
    asked = re.search(r"tried to allocate (\d+) bytes", str(e))
    if asked:
        return (f"training needs a block of {int(asked.group(1)) / 2**30:.1f} GiB that this "
                "machine cannot give (a smaller --width/--widths or --batch-size fits)")
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    # NOTE: SIGTERM (kill, a scheduler's time limit) stops a command as Ctrl-C does; by
    # default it would end this process alone and leave its background workers training.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"error: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        print(f"error: out of memory: {_memory_message(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no (a path, a full disk): no traceback
        where = f" {e.filename!r}" if e.filename else ""
        print(f"error:{where} {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def skip_final_collections() -> None:
    """Leave every object alive now out of the garbage collections Python runs as it exits.

    A process that imported torch, Optuna and pandas holds hundreds of thousands of objects,
    and its shutdown walks them all: on the 2-core dev VM that took 1.2-1.4 s at the end of
    every command and of every worker a sweep, search or report starts (while a parent
    waits for it). atexit handlers and the flushing of standard streams still run; objects
    frozen here are only reclaimed by the OS, so call this once the process's work is
    written and its files closed, just before it exits.
    """
    gc.freeze()


def entry(argv: list[str] | None = None) -> int:
    """The ``widedeep`` command: :func:`main`, then a quick exit. (Tests call :func:`main`,
    which leaves the garbage collector alone.)"""
    code = main(argv)
    skip_final_collections()
    return code


if __name__ == "__main__":
    sys.exit(entry())
