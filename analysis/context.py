"""What every report section shares: the profile, the record storage, and the writers.

Sections ask :class:`Context` to run their sweeps (through :mod:`widedeep.sweep`, so an
interrupted report resumes and a finished one trains nothing), to read the records back,
and to write tables and figures under stable names; each writer returns the Markdown that
embeds its output in ``README.md`` with a relative link.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis import plots
from analysis.profiles import Profile
from analysis.tables import to_markdown, write_table
from widedeep import sweep


def make_spec(profile: Profile, section: str, *, seeds, grid: dict, fixed: dict | None = None,
              dataset: str = "diabetes", split: str = "holdout") -> sweep.SweepSpec:
    """A validated sweep spec whose name carries a digest of its content.

    The digest means an edited profile starts a fresh study instead of colliding with the
    records of the old one under the same name.
    """
    fixed = dict(fixed or {})
    if profile.engine != "auto":  # auto stays implicit: the studies of earlier reports match
        fixed["engine"] = profile.engine
    body = {"sweep": {"dataset": dataset, "split": split, "seeds": [int(s) for s in seeds]},
            "fixed": fixed, "grid": {k: list(v) for k, v in grid.items()}}
    digest = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]
    body["sweep"]["name"] = f"report-{profile.name}-{section}-{digest}"
    return sweep.spec_from_dict(body)


@dataclass
class Context:
    profile: Profile
    out: Path
    storage: str
    workers: int = 1
    progress: bool = True
    env: dict = field(default_factory=dict)
    sweeps: list[dict] = field(default_factory=list)  # what ran, for environment.json
    cache: dict = field(default_factory=dict)  # results one section hands to another
    # sweep_worker.Background: workers running sections' sweeps ahead of them
    background: object | None = None
    _trials: dict = field(default_factory=dict)
    _records: dict = field(default_factory=dict)

    @property
    def tables_dir(self) -> Path:
        return self.out / "tables"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"

    def run(self, spec: sweep.SweepSpec) -> dict:
        """Run whatever of ``spec`` is not yet in the storage (waiting first for the
        background workers where they run it); small sweeps use one worker."""
        total = len(spec.points()) * len(spec.seeds)
        # spawning a worker process costs seconds: not worth it for a handful of trials
        workers = self.workers if total >= 4 * self.workers else 1
        start = time.perf_counter()
        ran = 0
        if self.background is not None and spec.name in self.background.names:
            self.background.names.discard(spec.name)  # its trials are counted once
            if not self.background.wait(spec, progress=self.progress) and self.progress:
                print(f"  sweep {spec.name}: the background workers stopped before it "
                      "finished; running the rest here", flush=True)
            ran = self.background.ran(spec.name)
        counts = sweep.run_sweep(spec, storage=self.storage, workers=workers,
                                 progress=self.progress)
        counts["ran_now"] += ran
        self.sweeps.append({"name": spec.name, **counts,
                            "seconds": round(time.perf_counter() - start, 1)})
        if self.progress:
            print(f"  sweep {spec.name}: {counts['done']}/{counts['total']} done, "
                  f"{counts['ran_now']} trained now, {counts['failed']} failed", flush=True)
        return counts

    def trials(self, spec: sweep.SweepSpec) -> pd.DataFrame:
        """The sweep's flat trial rows (one per grid point x seed) as a DataFrame."""
        if spec.name not in self._trials:
            self._trials[spec.name] = pd.DataFrame(sweep.trials(spec, storage=self.storage))
        return self._trials[spec.name]

    def records(self, spec: sweep.SweepSpec) -> list[dict]:
        """The sweep's full records (summary, history, probes) per trial."""
        if spec.name not in self._records:
            self._records[spec.name] = sweep.trial_records(spec, storage=self.storage)
        return self._records[spec.name]

    def table(self, name: str, df: pd.DataFrame, caption: str = "",
              embed: bool = True) -> str:
        """Write ``tables/name.csv`` and ``.md``; Markdown that shows (or links) the table."""
        write_table(self.tables_dir, name, df)
        link = f"[`tables/{name}.csv`](tables/{name}.csv)"
        head = f"{caption} ({link})" if caption else link
        return f"{head}\n\n{to_markdown(df)}\n" if embed else f"{head}\n"

    def figure(self, name: str, fig, title: str, alt: str | None = None) -> str:
        """Save ``fig`` as ``figures/name.png``; Markdown that embeds it."""
        plots.save(fig, self.figures_dir / f"{name}.png", title)
        return f"![{alt or title}](figures/{name}.png)\n"
