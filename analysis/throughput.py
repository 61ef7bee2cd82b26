"""Throughput tables and figures from pytest-benchmark JSON (``results/benchmarks/*.json``).

``build(results_dir)`` reads every JSON there (written by ``pytest bench/ --benchmark-json``)
and writes ``results/tables/throughput*.csv|.md`` and ``results/figures/throughput_*.png``:
samples/s against width for each depth and device, the CPU-vs-CUDA speedup over depth x
width (when both devices were measured), and the fraction of the matmul peak measured in
the same run. ``python -m analysis.throughput [RESULTS_DIR]`` does the same from a shell.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

INTS = ["depth", "width", "batch_size", "n_params", "flops_per_step"]
KEYS = ["device", "kind", "depth", "width", "batch_size", "full_batch", "activation", "step"]
CUDA_MISSING = (
    "No CUDA benchmark results in {where}: the CUDA throughput curves and the CPU-vs-CUDA "
    "speedup heatmap are missing. To produce them, on a GPU machine run "
    "`pytest bench/ --benchmark-json results/benchmarks/cuda-full.json` (or `-m quick` for "
    "the quick subset), copy the JSON into {where} and rerun "
    "`python -m analysis.throughput`."
)

# ------------------------------------------------------------------ loading


def read_run(path: Path) -> tuple[pd.DataFrame, dict]:
    """One benchmark JSON as rows (one per benchmark) and its machine description."""
    run = json.loads(Path(path).read_text())
    info = run["machine_info"]
    machine = {
        "file": Path(path).name,
        "label": info.get("machine_label") or info.get("node", "?"),
        "cpu_model": info.get("cpu_model"),
        "cuda_device": info.get("cuda_device"),
        "torch_version": info.get("torch_version"),
        "threads": info.get("threads"),
        "datetime": run.get("datetime"),
    }
    rows = [_row(bench, machine) for bench in run["benchmarks"]]
    frame = _with_peak(pd.DataFrame(rows).astype({k: "Int64" for k in INTS}))
    machine["devices"] = sorted(frame["device"].dropna().unique()) if len(frame) else []
    return frame, machine


def _row(bench: dict, machine: dict) -> dict:
    extra, median = bench.get("extra_info", {}), bench["stats"]["median"]
    samples = extra.get("samples_per_call")
    flops = extra.get("flops_per_step")
    return {
        "name": bench["name"],
        **{k: extra.get(k) for k in KEYS},
        "n_params": extra.get("n_params"),
        "median_s": median,
        "samples_per_s": extra.get("samples_per_s", samples / median if samples else None),
        # best case (min time): steadier than the median on a busy shared machine
        "samples_per_s_best": samples / bench["stats"]["min"] if samples else None,
        "flops_per_step": flops,
        "gflops_per_s": extra.get("gflops_per_s", flops / median / 1e9 if flops else None),
        "gflops_per_s_best": flops / bench["stats"]["min"] / 1e9 if flops else None,
        "models": extra.get("models", 1),
        "engine": extra.get("engine"),
        "threads": extra.get("threads", machine["threads"]),
        "machine": machine["label"],
        "file": machine["file"],
        "datetime": machine["datetime"],
    }


def _with_peak(frame: pd.DataFrame) -> pd.DataFrame:
    """Add this run's matmul peak per device and each row's fraction of it: from medians,
    and from best (min) times, which a busy shared machine disturbs less."""
    if frame.empty:
        return frame
    peak = frame[frame["kind"] == "peak"].groupby("device")
    frame["peak_gflops_per_s"] = frame["device"].map(peak["gflops_per_s"].max())
    frame["fraction_of_peak"] = frame["gflops_per_s"] / frame["peak_gflops_per_s"]
    best = frame["device"].map(peak["gflops_per_s_best"].max())
    frame["fraction_of_peak_best"] = frame["gflops_per_s_best"] / best
    return frame


def load(bench_dir: Path) -> tuple[pd.DataFrame, list[dict]]:
    """All runs in ``bench_dir``; for a repeated case the newest run wins."""
    frames, machines = [], []
    for path in sorted(Path(bench_dir).glob("*.json")):
        frame, machine = read_run(path)
        frames.append(frame)
        machines.append(machine)
    if not frames:
        return pd.DataFrame(columns=["name", *KEYS]), machines
    data = pd.concat(frames, ignore_index=True).sort_values("datetime")
    data = data.drop_duplicates(subset=["name", "device"], keep="last")
    return data.sort_values(KEYS, na_position="first").reset_index(drop=True), machines


# ------------------------------------------------------------------ tables


def grid(data: pd.DataFrame) -> pd.DataFrame:
    """The ReLU step grid (kind ``step``), with a readable batch label."""
    steps = data[data["kind"] == "step"].copy()
    steps["batch"] = [f"full ({b})" if full else str(b)
                      for b, full in zip(steps["batch_size"], steps["full_batch"], strict=True)]
    return steps


def speedup(data: pd.DataFrame) -> pd.DataFrame:
    """CUDA / CPU samples/s per depth and width, full batch; empty without both devices."""
    steps = grid(data)
    steps = steps[steps["full_batch"].astype(bool)]
    table = steps.pivot_table(index=["depth", "width"], columns="device",
                              values="samples_per_s")
    if not {"cpu", "cuda"} <= set(table.columns):
        return pd.DataFrame(columns=["depth", "width", "speedup"])
    table["speedup"] = table["cuda"] / table["cpu"]
    return table.dropna(subset=["speedup"]).reset_index()[["depth", "width", "cpu", "cuda",
                                                           "speedup"]]


ENGINE_KINDS = {"lecture": "the lecture's own loop", "library-lecture": "widedeep plain loop",
                "sklearn": "scikit-learn MLPClassifier", "plain": "widedeep plain loop",
                "batched": "widedeep batched engine"}


def engines(data: pd.DataFrame) -> pd.DataFrame:
    """Cost per model-epoch of the lecture-size references and the batched engine, with the
    speedup over the plain loop measured on one thread in the same run."""
    wide = data["name"].str.startswith("test_wide")  # wide nets: see wide_nets()
    rows = data[data["kind"].isin(list(ENGINE_KINDS)) & ~wide].copy()
    if rows.empty:
        return rows
    rows["what"] = rows["kind"].map(ENGINE_KINDS)
    rows["us_per_model_epoch"] = rows["median_s"] * 1e6 / rows["models"].astype(float)
    plain = rows.loc[rows["kind"] == "plain", "us_per_model_epoch"]
    rows["speedup_vs_plain"] = plain.min() / rows["us_per_model_epoch"] if len(plain) else None
    cols = ["name", "what", "step", "models", "threads", "us_per_model_epoch", "speedup_vs_plain",
            "fraction_of_peak", "file"]
    return rows[cols].sort_values("us_per_model_epoch", ascending=False).reset_index(drop=True)


def wide_nets(data: pd.DataFrame) -> pd.DataFrame:
    """The batched engine on wide nets: achieved GFLOP/s as a fraction of the matmul peak."""
    rows = data[data["name"].str.startswith("test_wide")]
    return rows[["name", "models", "threads", "gflops_per_s", "peak_gflops_per_s",
                 "fraction_of_peak", "fraction_of_peak_best", "file"]].reset_index(drop=True)


def sweep_commands(data: pd.DataFrame) -> pd.DataFrame:
    """Many runs end to end (kinds ``sweep``: whole ``widedeep sweep`` commands; ``runs``:
    search-like trials): seconds per engine, and the speedup of each over the plain engine
    of the same benchmark measured in the same run (file)."""
    rows = data[data["kind"].isin(["sweep", "runs"])]
    if rows.empty:
        return pd.DataFrame(columns=["name", "engine", "models", "seconds", "speedup_vs_plain"])
    rows = rows.assign(seconds=rows["median_s"], bench=rows["name"].str.split("[").str[0])
    plain = rows[rows["engine"] == "plain"].groupby(["file", "bench"])["seconds"].min()
    keys = pd.MultiIndex.from_frame(rows[["file", "bench"]])
    rows = rows.assign(speedup_vs_plain=plain.reindex(keys).to_numpy() / rows["seconds"])
    return rows[["name", "engine", "models", "seconds", "speedup_vs_plain", "file"]].reset_index(
        drop=True)


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A pipe table (no tabulate dependency); floats to ``digits`` significant figures."""
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if pd.isna(v) else f"{v:,.0f}" if abs(v) >= 1e3 else f"{v:.{digits}g}"
        return str(v)
    head = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def markdown_report(data: pd.DataFrame, machines: list[dict]) -> str:
    """Samples/s pivots (depth x width) per device and batch, references, activations."""
    out = ["# Training throughput", "", "Samples per second of one SGD step, from the median "
           "and from the best (min) time; on a busy shared machine the median moves by 50 % "
           "or more between runs. Machines: "
           + "; ".join(f"{m['file']}: {m['label']}" for m in machines), ""]
    steps = grid(data)
    for (device, batch), part in steps.groupby(["device", "batch"], sort=True):
        for stat, column in (("median", "samples_per_s"), ("best", "samples_per_s_best")):
            pivot = part.pivot_table(index="depth", columns="width", values=column)
            out += [f"## {device}, batch {batch}: samples/s, {stat} (depth x width)", "",
                    markdown(pivot.reset_index()), ""]
    refs = data[data["kind"] != "step"]
    cols = ["kind", "name", "device", "median_s", "samples_per_s", "samples_per_s_best",
            "gflops_per_s",
            "fraction_of_peak", "file"]
    out += ["## References and activations", "", markdown(refs[cols]), ""]
    return "\n".join(out)


def write_tables(data: pd.DataFrame, machines: list[dict], tables: Path) -> list[Path]:
    tables.mkdir(parents=True, exist_ok=True)
    paths = [tables / "throughput.csv", tables / "throughput.md"]
    data.to_csv(paths[0], index=False)
    paths[1].write_text(markdown_report(data, machines) + "\n")
    ratio = speedup(data)
    if not ratio.empty:
        paths += [tables / "throughput_speedup.csv", tables / "throughput_speedup.md"]
        ratio.to_csv(paths[2], index=False)
        paths[3].write_text("# CUDA / CPU speedup, full batch\n\n" + markdown(ratio) + "\n")
    # the batched engine's tables, each where its benchmarks ran (the lecture cases need the
    # lecture file; the wide nets and the search-like trials do not)
    cost = engines(data)
    parts = [(title, frame) for title, frame in ((ENGINES_TITLE, cost),
                                                 (WIDE_TITLE, wide_nets(data)),
                                                 (SWEEP_TITLE, sweep_commands(data)))
             if not frame.empty]
    if not cost.empty:
        paths.append(tables / "throughput_engines.csv")
        cost.to_csv(paths[-1], index=False)
    if parts:
        paths.append(tables / "throughput_engines.md")
        paths[-1].write_text("\n".join(f"{title}\n\n{markdown(frame)}\n" for title, frame in parts))
    return paths


ENGINES_TITLE = ("Lecture-size nets (8-6-4-1 sigmoid, 759 rows, one full-batch epoch): "
                 "µs per model-epoch (median), and speedup over widedeep's plain loop on one "
                 "thread in the same run.")
WIDE_TITLE = ("Wide nets (2 hidden layers of 512 or 1024 ReLU units, full batch) on the batched "
              "engine: achieved GFLOP/s as a fraction of the run's float32 matmul peak, from "
              "median times and from best times (the peak is measured earlier in the run, so on "
              "a busy machine the median-based fraction moves between runs).")
SWEEP_TITLE = ("Many runs end to end, seconds (median) per engine and speedup over "
               "`engine = \"plain\"` of the same benchmark in the same run: "
               "`test_sweep_command`, the whole `widedeep sweep` command (a child process, "
               "from empty storage) for 64 seeds of the lecture preset, 100 full-batch epochs "
               "each; `test_search_trials`, five search-like configs (Wide & Deep, dropout, "
               "layer norm, mini-batches, early stopping) under 5-fold cross-validation on "
               "breast_cancer, trained as search trials are.")


# ------------------------------------------------------------------ figures


def _plotting():
    """pyplot, seaborn and the report's plotting helpers (headless, the report's style):
    the figures look the same whether the report or this module's command draws them."""
    from analysis import plots

    plots.sns.set_theme(style="whitegrid", context="notebook")
    return plots.plt, plots.sns, plots


def _line_by_width(steps: pd.DataFrame, y: str, ylabel: str, title: str, path: Path) -> Path:
    """One panel per device: ``y`` against width, a line per depth, a dash per batch."""
    plt, sns, plots = _plotting()
    steps = steps.assign(depth=steps["depth"].astype(int).astype(str))
    order = sorted(steps["depth"].unique(), key=int)
    g = sns.relplot(data=steps, x="width", y=y, hue="depth", hue_order=order, style="batch",
                    col="device", kind="line", marker="o", errorbar=None, height=4, aspect=1.4,
                    facet_kws={"sharey": False})
    widths = sorted(int(w) for w in steps["width"].unique())
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(widths, labels=[str(w) for w in widths])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    g.set_axis_labels("hidden width (units per layer, log scale)", ylabel)
    return plots.save(g.figure, path, title)


def _speedup_heatmap(ratio: pd.DataFrame, path: Path) -> Path:
    _, sns, plots = _plotting()
    table = ratio.pivot(index="depth", columns="width", values="speedup")
    fig, ax = plots.new_figure(6, 4.5)
    sns.heatmap(table, annot=True, fmt=".3g", cmap="viridis", ax=ax,
                cbar_kws={"label": "CUDA / CPU samples/s (x)"})
    ax.set(xlabel="hidden width (units per layer)", ylabel="depth (hidden layers)")
    return plots.save(fig, path, "CUDA speedup over CPU, one full-batch SGD step")


def write_figures(data: pd.DataFrame, figures: Path) -> list[Path]:
    figures.mkdir(parents=True, exist_ok=True)
    steps = grid(data)
    if steps.empty:
        return []
    paths = [_line_by_width(steps, "samples_per_s", "samples/s (log scale)",
                            "Training throughput of one SGD step (ReLU MLP)",
                            figures / "throughput_samples_vs_width.png")]
    full = steps[steps["full_batch"].astype(bool)].dropna(subset=["fraction_of_peak"])
    if not full.empty:
        paths.append(_line_by_width(full, "fraction_of_peak",
                                    "fraction of matmul peak (GFLOP/s / peak, log scale)",
                                    "Achieved fraction of the run's float32 matmul peak",
                                    figures / "throughput_fraction_of_peak.png"))
    ratio = speedup(data)
    if not ratio.empty:
        paths.append(_speedup_heatmap(ratio, figures / "throughput_speedup.png"))
    return paths


# ------------------------------------------------------------------ entry points


def build(results_dir: Path) -> dict:
    """Tables and figures from ``results_dir/benchmarks/*.json``; paths, notes, machines."""
    results_dir = Path(results_dir)
    bench_dir = results_dir / "benchmarks"
    data, machines = load(bench_dir)
    if data.empty:
        return {"tables": [], "figures": [], "machines": machines,
                "notes": [f"No benchmark JSON in {bench_dir}: run `tox -e bench` or `pytest "
                          f"bench/ -m quick --benchmark-json {bench_dir}/cpu-quick.json`."]}
    notes = []
    if "cuda" not in set(data["device"].dropna()):
        notes.append(CUDA_MISSING.format(where=bench_dir))
    if data["peak_gflops_per_s"].isna().all():
        notes.append("No matmul peak in these runs: fraction of peak is not available.")
    return {"tables": write_tables(data, machines, results_dir / "tables"),
            "figures": write_figures(data, results_dir / "figures"),
            "notes": notes, "machines": machines}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results", type=Path,
                        help="folder holding benchmarks/*.json (default: results)")
    out = build(parser.parse_args(argv).results_dir)
    for path in out["tables"] + out["figures"]:
        print(path)
    for note in out["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
