"""Checkpoints of ``widedeep train --out DIR``: an interrupted run resumes where it stopped.

While it trains, the run's state is saved beside the run folder, in ``DIR.checkpoint.pt``:
on the plain loop, the finished folds and the current fold's weights, optimiser, random
streams, losses and probes after its last whole epoch; on the batched engine, the same of
its stacks of models. It is saved every ``$WIDEDEEP_CHECKPOINT_S`` seconds (default 60) and
when the run is interrupted: Ctrl-C or SIGTERM during training is held until the epoch
ends, the state is saved, and the command stops (a second signal stops it at once).
``--resume`` with the same options continues from there, to the same losses and weights as
an uninterrupted run. The run folder itself is still written only when the run is
complete, and the checkpoint is then removed.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from pathlib import Path

import torch

from widedeep.errors import UserError
from widedeep.records import atomic_file

VERSION = 1


def every_s() -> float:
    """Seconds between saves: ``$WIDEDEEP_CHECKPOINT_S``, default 60."""
    text = os.environ.get("WIDEDEEP_CHECKPOINT_S", "60")
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"WIDEDEEP_CHECKPOINT_S must be a number of seconds >= 0, got {text!r}")
    return value


def path_for(out: str | os.PathLike) -> Path:
    """Where the checkpoint of run folder ``out`` lives: beside it, not in it."""
    out = Path(out)
    return out.with_name(out.name + ".checkpoint.pt")


class Checkpoint:
    """The saved state of one run; ``fold_states`` are finished folds (on the batched
    engine: stacks), ``current`` the state of the one in training (None before its first
    save)."""

    def __init__(self, out: str | os.PathLike, config: dict, every: float | None = None,
                 engine: str = "plain"):
        self.path, self.config, self.engine = path_for(out), config, engine
        self.every = every_s() if every is None else every
        self.fold_states: dict[int, dict] = {}
        self.current: tuple[int, dict] | None = None
        self.pending = False  # a signal waiting for the end of the epoch
        self._last = self._started = time.monotonic()
        self.seconds_before = 0.0  # training time of the sessions before this one

    @classmethod
    def start(cls, out: str | os.PathLike, config: dict, resume: bool,
              every: float | None = None, engine: str = "plain") -> Checkpoint:
        """A fresh checkpoint, or with ``resume`` the saved one (which must exist and have
        been made with the same config, by the same engine)."""
        ck = cls(out, config, every, engine)
        if not resume:
            if ck.path.exists():
                raise UserError(f"{str(ck.path)!r} holds an interrupted run: add --resume to "
                                "continue it, or delete it to start over")
            return ck
        if not ck.path.exists():
            raise UserError(f"nothing to resume: no checkpoint {str(ck.path)!r}")
        try:
            saved = torch.load(ck.path, map_location="cpu", weights_only=False)
        except Exception as e:  # truncated, or not ours: say so, no traceback
            raise UserError(f"cannot read checkpoint {str(ck.path)!r}: {e}") from None
        if not isinstance(saved, dict) or saved.get("version") != VERSION:
            raise UserError(f"{str(ck.path)!r} is not a widedeep checkpoint of this version")
        differ = sorted(k for k in set(config) | set(saved["config"])
                        if config.get(k) != saved["config"].get(k))
        if differ:
            raise UserError(f"the checkpoint {str(ck.path)!r} was made with other options "
                            f"({', '.join(differ)}); give the same options to resume it")
        if saved["engine"] != engine:  # e.g. a CUDA device that came or went (--device auto)
            raise UserError(f"the checkpoint {str(ck.path)!r} was made by the {saved['engine']} "
                            f"engine, and this run would train on the {engine} one; give "
                            f"--engine {saved['engine']} to resume it")
        ck.fold_states, ck.current = saved["fold_states"], saved["current"]
        ck.seconds_before = saved["seconds"]
        return ck

    def resume_state(self, fold: int) -> dict | None:
        """The saved mid-training state of ``fold``, if the checkpoint has one."""
        if self.current is not None and self.current[0] == fold:
            return self.current[1]
        return None

    def save(self, fold: int | None = None, state: dict | None = None) -> None:
        """Write the finished folds and (``fold``, ``state``), atomically."""
        self.current = (fold, state) if fold is not None else None
        seconds = self.seconds_before + time.monotonic() - self._started
        with atomic_file(self.path, binary=True) as f:
            torch.save({"version": VERSION, "config": self.config, "engine": self.engine,
                        "seconds": seconds, "fold_states": self.fold_states,
                        "current": self.current}, f)
        self._last = time.monotonic()

    def due(self) -> bool:
        """Whether to save at this epoch's end: every ``every`` seconds, or a signal held."""
        return self.pending or time.monotonic() - self._last >= self.every

    def save_epoch(self, fold: int, epoch: int, epochs: int, state: dict) -> None:
        """Save ``fold``'s ``state`` after epoch ``epoch``, then stop where a signal is
        held."""
        self.save(fold, state)
        if self.pending:
            raise KeyboardInterrupt(f"epoch {epoch} of {epochs} saved in {self.path}; run the "
                                    "same command with --resume to continue")

    def finish(self, fold: int, state: dict) -> None:
        """Record and save a finished fold (on the batched engine: stack)."""
        self.fold_states[fold] = state
        self.save()

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    @contextlib.contextmanager
    def training(self):
        """Inside, the first SIGINT or SIGTERM is held for the end of the epoch (see
        ``widedeep.train.fit``); outside, and for a second signal, they stop at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def hold(signum, frame):
            if self.pending:
                raise KeyboardInterrupt
            self.pending = True

        before = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
        if self.pending:  # a signal held past the last epoch: stop now
            raise KeyboardInterrupt
