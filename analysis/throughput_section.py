"""Section 7: training throughput, from the benchmark JSON under ``results/benchmarks/``.

The tables and figures themselves come from :func:`analysis.throughput.build` (the benchmark
issue's module); this section only embeds them and names the machines they were measured on.
"""

from __future__ import annotations

from pathlib import Path

from analysis.context import Context

HOW_TO = ("No benchmark records under `{where}` yet. Produce them with "
          "`pytest bench/ -m quick --benchmark-json {where}/cpu-quick.json` (on a GPU "
          "machine too, for the CPU-vs-CUDA speedup) and rerun `widedeep report`: finished "
          "sweeps are not retrained.")


def _machine_line(m: dict) -> str:
    device = m.get("cuda_device") or m.get("cpu_model") or "?"
    return (f"- `{m.get('file')}`: {m.get('label')} — {device}, torch "
            f"{m.get('torch_version')}, {m.get('threads')} threads, {m.get('datetime')}")


def _link(path: Path, out: Path) -> str:
    return Path(path).resolve().relative_to(out.resolve()).as_posix()


def render(ctx: Context) -> str:
    """Embed the throughput tables and figures, or say how to produce them."""
    head = "## 7. Throughput\n"
    bench_dir = ctx.out / "benchmarks"
    if not bench_dir.is_dir() or not any(bench_dir.glob("*.json")):
        return head + "\n" + HOW_TO.format(where=bench_dir.as_posix()) + "\n"
    try:
        from analysis import throughput
    except ImportError:  # the benchmark module is not installed in this checkout
        return head + "\n" + HOW_TO.format(where=bench_dir.as_posix()) + "\n"
    built = throughput.build(ctx.out)
    machines = built.get("machines", [])
    parts = [head, "Measured on (every figure below comes from these runs):\n",
             "\n".join(_machine_line(m) for m in machines) + "\n"]
    parts += [f"> {note}\n" for note in built.get("notes", [])]
    for path in built.get("figures", []):
        rel = _link(path, ctx.out)
        parts.append(f"![{Path(path).stem}]({rel})\n")
        parts.append("Machines: " + "; ".join(f"{m.get('label')} "
                                             f"({m.get('cuda_device') or m.get('cpu_model')})"
                                             for m in machines) + "\n")
    engines = [p for p in built.get("tables", []) if Path(p).name == "throughput_engines.md"]
    if engines:  # small enough to read inline: the engine comparison of issue 6
        parts.append(Path(engines[0]).read_text())
    tables = [p for p in built.get("tables", []) if str(p).endswith(".md")]
    parts.append("Tables: " + ", ".join(f"[`{_link(p, ctx.out)}`]({_link(p, ctx.out)})"
                                        for p in tables) + "\n")
    return "\n".join(parts)
