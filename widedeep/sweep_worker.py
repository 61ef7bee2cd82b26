"""Sweep workers: claim a grid point's pending seeds, train them through ``run_many``, record.

Exactly once: a trial is trained only by the worker whose claim moved its row to
``running`` (see :mod:`widedeep.sweep_store`). A worker's heartbeat thread renews its lease;
after a crash the row is claimed again once the lease is ``grace_s`` old, and the lost
attempt's Optuna trial is marked failed -- or, when it had already completed, the row is
simply closed without training. Results are written to Optuna before the row is closed, so
a crash in between costs a lookup, never a second training run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from tqdm import tqdm

from widedeep import sweep_trials
from widedeep.errors import UserError
from widedeep.run import run_many
from widedeep.sweep_store import TERMINAL, Store, blob_attrs

MAX_ATTEMPTS = 3  # a trial that fails (or kills its worker) this often is recorded as failed
GRACE_S = 60.0  # a running trial with no heartbeat for this long belongs to a lost worker
HEARTBEAT_S = 5.0
POLL_S = 0.5
KEY_ATTR = "widedeep:key"


_INTERRUPTED = threading.Event()
_DEFERRED = [False]  # True: a SIGINT is remembered, and raised at the next check


def handle_interrupts(before=None) -> None:
    """In a worker process: a SIGINT raises KeyboardInterrupt where it lands, and is
    remembered (``check_interrupted``). Where it lands may be a weakref callback of the
    garbage collector, which Python reports as ignored (a traceback on stderr) and goes on
    from: such reports are dropped, and the worker stops at its next check instead.
    ``before``: called first, in the handler."""
    def handler(signum, frame):
        if before is not None:
            before()
        _INTERRUPTED.set()
        if not _DEFERRED[0]:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = _drop_lost_interrupts


def _drop_lost_interrupts(info) -> None:
    if not (info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt)):
        sys.__unraisablehook__(info)


def check_interrupted(*_) -> None:
    """Raise KeyboardInterrupt if an interrupt came (and got lost in a callback)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts(defer: bool = True):
    """Inside, a SIGINT (see ``handle_interrupts``) is only remembered: bookkeeping that a
    KeyboardInterrupt must not cut in half -- a trial created but not yet known to its worker
    would stay RUNNING for good. Leaving the block for code that raises at once raises an
    interrupt that came meanwhile. ``defer=False`` inside such a block: raise at once again
    (a trial's training)."""
    saved, _DEFERRED[0] = _DEFERRED[0], defer
    try:
        yield
    finally:
        _DEFERRED[0] = saved
    if not saved:
        check_interrupted()


class _Heartbeat(threading.Thread):
    """Renews the lease of whatever token the worker holds, every ``every`` seconds."""

    def __init__(self, store: Store, every: float):
        super().__init__(daemon=True, name="widedeep-heartbeat")
        self.store, self.every, self.token = store, every, None
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every):
            token = self.token
            if token is not None:
                try:
                    self.store.heartbeat(token)
                except Exception as e:  # a busy database: the next beat will do
                    print(f"widedeep: heartbeat failed: {e}", file=sys.stderr)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _param(value):
    """Optuna params must be str/int/float/bool: lists (e.g. widths) go in as JSON."""
    return value if isinstance(value, str | int | float | bool) else json.dumps(value)


def _start_trials(store: Store, study, spec, rows: list[dict]) -> list[int]:
    """Create each row's attempt as a RUNNING Optuna trial and link it to the row; their
    trial ids."""
    dists = {k: CategoricalDistribution([_param(v) for v in values])
             for k, values in spec.grid.items()} | {"seed": CategoricalDistribution(
                 list(spec.seeds))}
    new = []
    for row in rows:
        point = json.loads(row["point"])
        params = {k: _param(v) for k, v in point.items()} | {"seed": row["seed"]}
        new.append(sweep_trials.NewTrial(
            params, {k: dists[k] for k in params}, system_attrs={KEY_ATTR: row["key"]},
            user_attrs={"attempt": row["attempts"], "worker": row["worker"]}))
    started = sweep_trials.start(store.optuna, store.study_id(study.study_name), new)
    store.update_many(study.study_name, [(r["key"], r["token"], {"trial_number": number})
                                         for r, (_, number) in zip(rows, started, strict=True)])
    return [trial_id for trial_id, _ in started]


def _fail_trials(store: Store, trial_ids: list[int], reason: str) -> None:
    """Mark attempts failed with their reason (those already finished stay as they are)."""
    sweep_trials.end(store.optuna, [sweep_trials.Ending(t, TrialState.FAIL,
                                                        user_attrs={"reason": reason})
                                    for t in trial_ids])


def _recover(store: Store, study, row: dict) -> bool:
    """A re-claimed row: close it if its last attempt completed (True), else fail that
    attempt's trial and any orphan RUNNING trial of the same key (False)."""
    if row["attempts"] <= 1:
        return False
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,
                                                          TrialState.COMPLETE)):
        if trial.system_attrs.get(KEY_ATTR) != row["key"]:
            continue
        if trial.state == TrialState.COMPLETE:
            store.update(study.study_name, row["key"], row["token"], state=trial.user_attrs[
                "status"], trial_number=trial.number, reason=None)
            return True
        _fail_trials(store, [store.trial_id(study, trial.number)], "worker lost (no heartbeat)")
    return False


def _train(configs: list) -> list:
    """RunResults, or the exception of each config that failed."""
    try:
        return run_many(configs)
    except Exception:
        if len(configs) == 1:
            return [sys.exc_info()[1]]
    out = []
    for config in configs:  # which one failed? run them one by one
        try:
            out += run_many([config])
        except Exception as e:
            out.append(e)
    return out


def _ending(trial_id: int, result) -> sweep_trials.Ending:
    if isinstance(result, BaseException):
        return sweep_trials.Ending(trial_id, TrialState.FAIL,
                                   user_attrs={"reason": _reason(result)})
    summary, loss = result.summary, result.summary.get("test_loss")
    status = "diverged" if summary.get("diverged") else "complete"
    return sweep_trials.Ending(
        trial_id, TrialState.COMPLETE,
        loss if loss is not None and math.isfinite(loss) else math.inf,
        {"status": status, "summary": summary} | blob_attrs("history", result.history)
        | blob_attrs("probes", result.probes))


def _reason(error: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]


def _record(store: Store, study, rows: list[dict], trial_ids: list[int], results: list) -> None:
    """Write the attempts' results to Optuna, then close their rows: a failed attempt's row
    goes back to pending (failed after MAX_ATTEMPTS); a result whose lease was taken over
    (its trial already failed as lost) is dropped."""
    endings = [_ending(t, r) for t, r in zip(trial_ids, results, strict=True)]
    written = sweep_trials.end(store.optuna, endings)
    changes = []
    for row, ending, ok, result in zip(rows, endings, written, results, strict=True):
        if ending.state == TrialState.FAIL:
            final = row["attempts"] >= MAX_ATTEMPTS
            changes.append((row["key"], row["token"], dict(
                state="failed" if final else "pending", token=None,
                reason=ending.user_attrs["reason"])))
        elif ok:
            changes.append((row["key"], row["token"], dict(
                state=ending.user_attrs["status"], token=None,
                reason=result.summary.get("diverged_reason"))))
    store.update_many(study.study_name, changes)


def _run_group(store: Store, study, spec, rows: list[dict]) -> int:
    todo = [r for r in rows if not _recover(store, study, r)]
    trial_ids = []
    try:
        # An interrupt while the trials are created is raised on leaving this block, after
        # trial_ids is set: inside the try, so that those trials are failed, not left RUNNING
        # (the row's claim is given back, and its next attempt would not look for them).
        with deferred_interrupts():
            trial_ids = _start_trials(store, study, spec, todo)
        configs = [spec.config(json.loads(r["point"]), r["seed"]) for r in todo]
        results = _train(configs) if configs else []
    except BaseException:  # Ctrl-C: these attempts do not count
        with deferred_interrupts():
            _fail_trials(store, trial_ids, "interrupted")
        raise
    with deferred_interrupts():
        _record(store, study, todo, trial_ids, results)
    return len(rows)


def work(spec, url: str, *, worker: str, group: int, grace_s: float, on_done=None,
         threads: int | None = None, store: Store | None = None) -> None:
    """Claim and run trials until every row of the sweep is finished (in ``store`` when
    given, an open Store of ``url``, else in one opened here)."""
    work_all([(spec, group)], url, worker=worker, grace_s=grace_s, on_done=on_done,
             threads=threads, store=store)


def work_all(jobs: list[tuple], url: str, *, worker: str, grace_s: float, on_done=None,
             threads: int | None = None, store: Store | None = None) -> None:
    """``work`` for several sweeps, given as (spec, group) pairs: first each sweep's
    claimable trials in turn, moving on as soon as a sweep has none left to claim (trials
    in flight belong to other workers); then each sweep again until it is finished (taking
    over the trials of lost workers)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with Store(url) if store is None else contextlib.nullcontext(store) as store:
        beat = _Heartbeat(store, min(HEARTBEAT_S, grace_s / 4))
        beat.start()
        try:
            for linger in (False, True) if len(jobs) > 1 else (True,):
                for spec, group in jobs:
                    _loop(store, store.study(spec.name), spec, beat, worker=worker,
                          group=group, grace_s=grace_s, on_done=on_done, linger=linger)
        finally:
            beat.stop()


def _loop(store: Store, study, spec, beat: _Heartbeat, *, worker, group, grace_s, on_done,
          linger: bool = True):
    while True:
        check_interrupted()
        store.expire_exhausted(spec.name, grace_s, MAX_ATTEMPTS)
        token, rows = store.claim(spec.name, worker, group=group, grace_s=grace_s,
                                  max_attempts=MAX_ATTEMPTS)
        if token is None:
            if not linger:
                return
            counts = store.counts(spec.name)
            if not counts.get("pending") and not counts.get("running"):
                return
            time.sleep(POLL_S)  # others are running the rest; take over if they are lost
            continue
        beat.token = token
        try:
            n = _run_group(store, study, spec, rows)
        except BaseException:
            store.release(token)
            raise
        finally:
            beat.token = None
        if on_done is not None:
            on_done(n)


def _finished(store: Store, name: str, prefix: str | None = None) -> dict[str, int]:
    counts = store.counts(name, prefix)
    return {k: counts.get(k, 0) for k in TERMINAL}


def _run_id() -> str:
    """A prefix of this run's worker names: the trials they finish count as run now."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}/"


def _group(spec, workers: int) -> int:
    """Trials per claim: a grid point's seeds, batched together, when every worker can have a
    point of its own; else one."""
    n_points = math.prod(len(v) for v in spec.grid.values())
    return len(spec.seeds) if n_points >= workers else 1


def run_workers(spec, url: str, *, workers: int, progress: bool,
                grace_s: float | None, store: Store | None = None) -> dict:
    """Run ``workers`` workers (1: in this process) and return the sweep's counts (in
    ``store`` when given, an open Store of ``url``)."""
    grace_s = GRACE_S if grace_s is None else grace_s
    run_id = _run_id()
    group = _group(spec, workers)
    with Store(url) if store is None else contextlib.nullcontext(store) as store:
        total = len(spec.points()) * len(spec.seeds)
        bar = _bar(spec, store, progress)
        left = store.counts(spec.name)
        with bar:
            if not left.get("pending") and not left.get("running"):
                pass  # all done: a worker process would take seconds to start for nothing
            elif workers == 1:
                work(spec, url, worker=run_id + "0", group=group, grace_s=grace_s,
                     on_done=bar.update, store=store)
            else:
                job = dict(specs=[spec.to_dict()], groups=[group], url=url, grace_s=grace_s)
                _spawn(spec, job, run_id, workers, bar, store)
        done = _finished(store, spec.name)
        mine = _finished(store, spec.name, run_id)
    return {"total": total, "done": done["complete"] + done["diverged"],
            "failed": done["failed"], "diverged": done["diverged"],
            "ran_now": sum(mine.values())}


def _bar(spec, store: Store, progress: bool) -> tqdm:
    """A progress bar of the sweep's finished trials (shown on a terminal only)."""
    return tqdm(total=len(spec.points()) * len(spec.seeds),
                initial=sum(_finished(store, spec.name).values()),
                disable=not progress or not sys.stderr.isatty(), file=sys.stderr,
                unit="trial", desc=spec.name)


# A worker interrupted while it still imports exits quietly too: the interrupt is held
# until the imports are done and then ends the worker at once. (Raised at some point of an
# import, or let through after it, it can land in a weakref callback of the garbage
# collector, where Python prints it as ignored, traceback and all, and goes on.)
_LAUNCH = """import signal, sys
held = hasattr(signal, "pthread_sigmask")
if held:
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGINT}})
try:
    from {module} import _worker_main
    from widedeep.cli import skip_final_collections
    if held:
        if signal.SIGINT in signal.sigpending():
            sys.exit(130)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGINT}})
    code = _worker_main(sys.argv[1:])
except KeyboardInterrupt:
    code = 130
skip_final_collections()
sys.exit(code)
"""


def launch(job: dict, *, module: str = __name__, session: bool = False) -> subprocess.Popen:
    """A process running ``module._worker_main([job as JSON])`` with one torch thread.
    ``session``: in a session of its own, so that a Ctrl-C at the terminal reaches only the
    parent, which passes it on once (a second SIGINT would cut short a trial's
    bookkeeping)."""
    return subprocess.Popen([sys.executable, "-c", _LAUNCH.format(module=module),
                             json.dumps(dict(job, threads=1))], start_new_session=session)


def _spawn(spec, job: dict, run_id: str, workers: int, bar, store: Store) -> None:
    """Start ``workers`` processes for ``job`` and wait for them."""
    procs = [launch(dict(job, worker=f"{run_id}{i}"), session=True) for i in range(workers)]
    try:
        for p in procs:  # each returns as soon as it exits
            while True:
                try:
                    p.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    bar.update(sum(_finished(store, spec.name).values()) - bar.n)
    except BaseException:  # Ctrl-C or SIGTERM reached this process alone: pass it on, once
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        raise
    finally:
        for p in procs:
            try:
                p.wait(timeout=30)  # on Ctrl-C they release their claims and exit
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    bad = [f"{i}: {p.returncode}" for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise UserError(f"sweep worker(s) exited with an error (worker: status) "
                        f"{', '.join(bad)}; see the messages above")


class Background:
    """Worker processes that run several sweeps, in order, while the caller goes on (the
    report starts its sections' sweeps so, and each section waits for its own): worker
    start-up is paid once, and the next sweeps train while a section draws its figures."""

    def __init__(self, specs: list, url: str, *, workers: int, grace_s: float | None = None):
        """Start ``workers`` processes on ``specs`` (each already prepared in ``url``)."""
        self.url, self.names, self.run_id = url, {s.name for s in specs}, _run_id()
        job = dict(specs=[s.to_dict() for s in specs], groups=[_group(s, workers) for s in specs],
                   url=url, grace_s=GRACE_S if grace_s is None else grace_s)
        self.store = Store(url)
        self.procs = [launch(dict(job, worker=f"{self.run_id}{i}"), session=True)
                      for i in range(workers)]

    def wait(self, spec, *, progress: bool = False) -> bool:
        """Wait until no trial of ``spec`` is pending or running (True), or until every
        worker has exited first (False: the caller runs what is left)."""
        with _bar(spec, self.store, progress) as bar:
            while True:
                counts = self.store.counts(spec.name)
                bar.update(sum(counts.get(k, 0) for k in TERMINAL) - bar.n)
                if not counts.get("pending") and not counts.get("running"):
                    return True
                if all(p.poll() is not None for p in self.procs):
                    return False
                time.sleep(POLL_S)

    def ran(self, name: str) -> int:
        """Trials of sweep ``name`` these workers finished."""
        return sum(_finished(self.store, name, self.run_id).values())

    def stop(self) -> list[str]:
        """Interrupt workers still running (each gives back its claim), reap them and close
        the storage; "worker: status" of each that exited with an error before."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        bad = [f"{i}: {p.returncode}" for i, p in enumerate(self.procs)
               if p.returncode not in (None, 0)]
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.store.close()
        return bad


def _worker_main(argv: list[str]) -> int:
    """Entry point of a worker process: ``_worker_main([JOB_JSON])``, the job naming its
    sweeps (saved specs) and their claim groups, the storage URL and the worker."""
    from widedeep.sweep import SweepSpec

    handle_interrupts()
    job = json.loads(argv[0])
    jobs = [(SweepSpec.from_saved(spec), group)
            for spec, group in zip(job.pop("specs"), job.pop("groups"), strict=True)]
    try:
        work_all(jobs, job.pop("url"), **job)
    except KeyboardInterrupt:  # the parent reports the interruption
        return 130
    return 0
