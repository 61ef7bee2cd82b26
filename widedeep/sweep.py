"""Grid sweeps: a TOML spec, every grid point x seed run exactly once, results in Optuna storage.

A spec has three tables: ``[sweep]`` (name, dataset, split, seeds), ``[fixed]`` (any
``widedeep train`` option) and ``[grid]`` (option -> list of values). Every grid point x seed
is validated with :func:`widedeep.config.make_config` before any training. ``run_sweep``
records each trial in the study storage (see :mod:`widedeep.sweep_store`); ``trials``,
``trial_records`` and ``export_csv`` read it back for analysis.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from widedeep.config import OPTION_NAMES, PRESETS, make_config
from widedeep.errors import UserError
from widedeep.records import atomic_file, make_folder
from widedeep.sweep_store import TERMINAL, Store, get_blob

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SPEC_ATTR = "widedeep:spec"
DEFAULT_STORAGE = "sqlite:///results/sweeps.sqlite3"
_RESERVED = {"dataset": "[sweep] dataset", "split": "[sweep] split", "seed": "[sweep] seeds"}


@dataclass(frozen=True, kw_only=True)
class SweepSpec:
    name: str
    dataset: str
    split: str
    seeds: tuple[int, ...]
    fixed: dict  # option -> value
    grid: dict  # option -> list of values

    def points(self) -> list[dict]:
        """Every combination of the grid's values, in spec order."""
        names = list(self.grid)
        return [dict(zip(names, values, strict=True))
                for values in itertools.product(*self.grid.values())]

    def config(self, point: dict, seed: int):
        """The validated TrainConfig of one grid point and seed."""
        return make_config(dataset=self.dataset, split=self.split, seed=seed,
                           **self.fixed, **point)

    def to_dict(self) -> dict:
        """The spec in TOML's shape: {"sweep": {...}, "fixed": {...}, "grid": {...}}."""
        return {"sweep": {"name": self.name, "dataset": self.dataset, "split": self.split,
                          "seeds": list(self.seeds)},
                "fixed": dict(self.fixed), "grid": dict(self.grid)}

    @classmethod
    def from_saved(cls, d: dict) -> SweepSpec:
        """Rebuild a spec :meth:`to_dict` wrote, without validating it again."""
        return cls(**{**d["sweep"], "seeds": tuple(d["sweep"]["seeds"])}, fixed=d["fixed"],
                   grid=d["grid"])


def point_key(point: dict, seed: int | None = None) -> str:
    """sha1 of the canonical JSON of a grid point (and seed): the trial's unique key."""
    obj = point if seed is None else {"point": point, "seed": seed}
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- loading a spec


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a TOML sweep spec."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"sweep spec {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"sweep spec {str(path)!r} is not valid TOML: {e}") from None
    return spec_from_dict(d)


def _table(d: dict, name: str, *, required: bool = True) -> dict:
    if name not in d and not required:
        return {}
    value = d.get(name)
    if not isinstance(value, dict):
        raise UserError(f"sweep spec needs a [{name}] table, got {name}={value!r}")
    return value


def _check_options(table: str, options: dict) -> None:
    for name in options:
        if name in _RESERVED:
            raise UserError(f"[{table}] {name}: set it as {_RESERVED[name]}")
        if name not in OPTION_NAMES:
            raise UserError(f"[{table}] unknown option {name!r}; known: "
                            f"{', '.join(n for n in OPTION_NAMES if n not in _RESERVED)}")


def _check_grid(grid: dict, fixed: dict) -> None:
    if not grid:
        raise UserError("[grid] is empty: give at least one option with a list of values")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"[grid] {name} must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise UserError(f"[grid] {name} lists a value twice: {values!r}")
        if name in fixed:
            raise UserError(f"option {name!r} is in both [fixed] and [grid]")


def _sweep_fields(sweep: dict) -> dict:
    unknown = sorted(set(sweep) - {"name", "dataset", "split", "seeds"})
    if unknown:
        raise UserError(f"[sweep] unknown key(s) {', '.join(unknown)}; "
                        "known: name, dataset, split, seeds")
    name, seeds = sweep.get("name"), sweep.get("seeds", [0])
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"[sweep] name must be a non-empty string, got name={name!r}")
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise UserError(f"[sweep] seeds must be a non-empty list of distinct integers, "
                        f"got seeds={seeds!r}")
    fields = {"name": name, "seeds": tuple(seeds), "dataset": sweep.get("dataset", "diabetes"),
              "split": sweep.get("split", "holdout")}
    for key in ("dataset", "split"):
        if not isinstance(fields[key], str):
            raise UserError(f"[sweep] {key} must be a string, got {key}={fields[key]!r}")
    return fields


def _check_dataset(spec: SweepSpec) -> None:
    from widedeep.data import list_datasets, parse_split

    parse_split(spec.split)
    if "csv" not in spec.fixed and spec.dataset not in list_datasets():
        raise UserError(f"[sweep] unknown dataset {spec.dataset!r}; known: "
                        f"{', '.join(list_datasets())}")


def spec_from_dict(d: dict) -> SweepSpec:
    """Validate a spec given as a dict (TOML's shape); every point x seed via make_config."""
    unknown = sorted(set(d) - {"sweep", "fixed", "grid"})
    if unknown:
        raise UserError(f"sweep spec: unknown table(s) {', '.join(unknown)}; "
                        "known: sweep, fixed, grid")
    fixed, grid, head = _table(d, "fixed", required=False), _table(d, "grid"), _table(d, "sweep")
    _check_options("fixed", fixed)
    _check_options("grid", grid)
    _check_grid(grid, fixed)
    if "dataset" in head and ("csv" in fixed or "csv" in grid):
        raise UserError("[sweep] dataset and a csv option both name the data: give one")
    fields = _sweep_fields(head)
    preset = PRESETS.get(fixed.get("preset"), {})
    for key in ("dataset", "split"):  # unset in [sweep]: a [fixed] preset's own choice
        if key not in head and key in preset:
            fields[key] = preset[key]
    spec = SweepSpec(**fields, fixed=dict(fixed), grid=dict(grid))
    _check_dataset(spec)
    for point in spec.points():
        for seed in spec.seeds:
            try:
                spec.config(point, seed)
            except UserError as e:
                raise UserError(f"grid point {json.dumps(point)} seed {seed}: {e}") from None
    return spec


# ---------------------------------------------------------------------- running


def default_storage(spec: SweepSpec | None = None) -> str:
    """The embedded default: a SQLite file under ``results/`` (folder created)."""
    Path("results").mkdir(exist_ok=True)
    return DEFAULT_STORAGE


def prepare(spec: SweepSpec, url: str, store: Store | None = None) -> None:
    """Create the study (or check it matches ``spec``) and its pending claim rows (in
    ``store`` when given, an open Store of ``url``)."""
    with Store(url) if store is None else contextlib.nullcontext(store) as store:
        study = store.study(spec.name, create=True, direction="minimize")
        saved = study.user_attrs.get(SPEC_ATTR)
        if saved is None:
            study.set_user_attr(SPEC_ATTR, spec.to_dict())
        elif saved != json.loads(json.dumps(spec.to_dict())):
            raise UserError(f"study {spec.name!r} in {url} was made from a different spec; "
                            "give the sweep another name or another --storage")
        seeds = len(spec.seeds)
        store.add_claims(spec.name, [
            {"key": point_key(p, s), "idx": i * seeds + j, "point_key": point_key(p),
             "point": json.dumps(p, sort_keys=True), "seed": s}
            for i, p in enumerate(spec.points()) for j, s in enumerate(spec.seeds)])


def _check_workers_and_grace(workers: int, grace_s: float | None) -> None:
    if workers < 1:
        raise UserError(f"workers must be >= 1, got workers={workers}")
    # NOTE: workers renew their lease every grace / 4 seconds: below a second that hammers
    # the database, and a lease that short is lost to any pause of the machine.
    if grace_s is not None and not (math.isfinite(grace_s) and grace_s >= 1):
        raise UserError(f"grace must be a number of seconds >= 1, got grace={grace_s}")


def run_sweep(spec: SweepSpec, *, storage: str | None = None, workers: int = 1,
              progress: bool = True, grace_s: float | None = None) -> dict:
    """Run every trial not yet done; returns {"total", "done", "failed", "diverged", "ran_now"}.

    ``grace_s``: seconds without a heartbeat before a running trial counts as lost.
    """
    from widedeep import sweep_worker

    _check_workers_and_grace(workers, grace_s)
    url = storage or default_storage(spec)
    with Store(url) as store:  # opened once: an Optuna storage takes ~0.5 s to open
        prepare(spec, url, store)
        return sweep_worker.run_workers(spec, url, workers=workers, progress=progress,
                                        grace_s=grace_s, store=store)


def start_sweeps(specs: list[SweepSpec], *, storage: str, workers: int,
                 grace_s: float | None = None):
    """Prepare ``specs`` and start ``workers`` processes that run those with trials left, in
    order, in the background; returns their :class:`widedeep.sweep_worker.Background`
    (``wait`` for a sweep, then ``run_sweep`` runs whatever a failed worker left), or None
    when every trial is done."""
    from widedeep import sweep_worker

    _check_workers_and_grace(workers, grace_s)
    with Store(storage) as store:
        for spec in specs:
            prepare(spec, storage, store)
        left = [s for s in specs if {"pending", "running"} & set(store.counts(s.name))]
    if not left:
        return None
    return sweep_worker.Background(left, storage, workers=workers, grace_s=grace_s)

# ---------------------------------------------------------------------- reading results


def _open(spec_or_name: SweepSpec | str, store: Store):
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    study = store.study(name)
    saved = study.user_attrs.get(SPEC_ATTR)
    if saved is None:
        raise UserError(f"study {name!r} in {store.url} is not a sweep")
    spec = SweepSpec.from_saved(saved)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    rows = [r for r in store.rows(name) if r["state"] in TERMINAL]
    return spec, rows, trials


def _flat(spec: SweepSpec, row: dict, trial) -> dict:
    point = json.loads(row["point"])
    out = {"study": spec.name, "point": point, "seed": row["seed"], "dataset": spec.dataset,
           "split": spec.split, **spec.fixed, **point, "status": row["state"],
           "reason": row["reason"], "attempts": row["attempts"],
           "trial_number": row["trial_number"]}
    summary = trial.user_attrs.get("summary", {}) if trial is not None else {}
    for key, value in summary.items():
        out.setdefault(key, value)
    return out


def trials(spec_or_name: SweepSpec | str, *, storage: str) -> list[dict]:
    """One flat dict per finished trial (grid point x seed), in grid order."""
    with Store(storage) as store:
        spec, rows, by_number = _open(spec_or_name, store)
    flat = [_flat(spec, r, by_number.get(r["trial_number"])) for r in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    return [{k: row.get(k) for k in columns} for row in flat]


def trial_records(spec_or_name: SweepSpec | str, *, storage: str) -> list[dict]:
    """{"point", "seed", "status", "params", "summary", "history", "probes"} per trial that ran
    to the end (complete or diverged)."""
    with Store(storage) as store:
        spec, rows, by_number = _open(spec_or_name, store)
    out = []
    for row in rows:
        trial = by_number.get(row["trial_number"])
        if row["state"] == "failed" or trial is None:
            continue
        point, attrs = json.loads(row["point"]), trial.user_attrs
        out.append({"point": point, "seed": row["seed"], "status": row["state"],
                    "params": {**point, "seed": row["seed"]}, "summary": attrs["summary"],
                    "history": get_blob(attrs, "history"), "probes": get_blob(attrs, "probes")})
    return out


def _cell(value):
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, list | dict) else value


def export_csv(spec_or_name: SweepSpec | str, path: str | os.PathLike, *,
               storage: str) -> Path:
    """Write :func:`trials` as one CSV table (lists and dicts as JSON); returns the path."""
    path = check_export(path)
    rows = trials(spec_or_name, storage=storage)
    with atomic_file(path, newline="") as f:  # an interrupted export leaves no half table
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["study"])
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    return path


def check_export(path: str | os.PathLike) -> Path:
    """``path`` as a Path, once it is known a CSV table can be written there (checked
    before a sweep runs, so that a typo costs no sweep)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--export {str(path)!r} is a folder: name a file, e.g. trials.csv")
    make_folder(path.parent)
    return path
