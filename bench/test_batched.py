"""Throughput of the batched engine against the plain loop, side by side in one run.

- Lecture-size nets (8-6-4-1 sigmoid, 759 rows, full batch): microseconds per model-epoch
  of the plain loop's step and of a K-model stack (K = 16, 64, 256), with the engine's own
  step and with its torch-ops step; ``extra_info`` holds the ratio plain / batched from this
  run (target: >= 15) and which step ran.
- Wide nets (width 512, 1024): GFLOP/s of a K-model stack as a fraction of this run's
  matmul peak (a large ``torch.mm``, measured first; target: >= 0.7).

Both sides run on the same number of threads (one for the lecture nets, as ``run`` does for
small nets; torch's default for the wide ones and the peak), recorded in ``extra_info``.
Run: ``pytest bench/test_batched.py`` (``-m quick`` for the quick subset).
"""

from __future__ import annotations

import pytest
import torch

from bench.harness import bench_mark, fill_extra_info, mlp_flops, mlp_sizes
from widedeep import data
from widedeep.batched_fit import Trainer, stack_data
from widedeep.batched_grad import ManualStep
from widedeep.config import make_config
from widedeep.errors import UserError
from widedeep.model import build_model
from widedeep.run import num_threads
from widedeep.train import Split, criterion_for, make_optimizer, train_step

PEAK_N = 2048
WIDE_ROWS, WIDE_FEATURES, WIDE_K = 1024, 32, 8


@pytest.fixture(scope="module")
def lecture() -> Split:
    try:
        ds = data.load_dataset("diabetes")
    except UserError as e:
        pytest.skip(f"the lecture file is not available ({e})")
    return Split(torch.as_tensor(ds.X), torch.as_tensor(ds.y))


@pytest.fixture(scope="module")
def plain_us() -> dict[str, float]:
    """Microseconds per epoch of the plain loop, filled by test_lecture_plain (runs first)."""
    return {}


def _trainer(train: Split, k: int, **options) -> tuple[Trainer, object]:
    configs = [make_config(seed=s, **options) for s in range(k)]
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, train.X.shape[1], 2))
    return Trainer(models, configs), stack_data([train] * k)


@pytest.mark.quick
@bench_mark("cpu")
def test_matmul_peak(benchmark, peak_gflops):
    """The machine's float32 matmul rate on torch's default threads."""
    a, b = (torch.randn(PEAK_N, PEAK_N) for _ in range(2))
    out = torch.empty(PEAK_N, PEAK_N)
    benchmark(torch.mm, a, b, out=out)
    fill_extra_info(benchmark, kind="peak", device="cpu", samples=None, flops=2 * PEAK_N**3,
                    threads=torch.get_num_threads())
    if "gflops_per_s" in benchmark.extra_info:
        peak_gflops["cpu"] = benchmark.extra_info["gflops_per_s"]


@pytest.mark.quick
@bench_mark("cpu")
def test_lecture_plain(benchmark, lecture, plain_us):
    """One full-batch epoch of the plain loop (``train_step``) on the lecture net."""
    config = make_config(preset="lecture")
    torch.manual_seed(0)
    model = build_model(config, 8, 2)
    optimizer, criterion = make_optimizer(config, model.parameters()), criterion_for(2)
    with num_threads(1):
        benchmark(train_step, model, lecture.X, lecture.y, criterion, optimizer)
    _fill(benchmark, k=1, n=len(lecture.y), widths=(6, 4), features=8, threads=1)
    if hasattr(benchmark, "stats") and benchmark.stats is not None:
        plain_us["lecture"] = benchmark.stats.stats.median * 1e6


@pytest.mark.parametrize("step", [pytest.param("auto", marks=pytest.mark.quick), "torch"])
@pytest.mark.parametrize("k", [pytest.param(64, marks=pytest.mark.quick), 16, 256])
@bench_mark("cpu")
def test_lecture_batched(benchmark, lecture, plain_us, k, step):
    """One full-batch epoch of K lecture nets on the batched engine: with the step it picks
    (the compiled one where there is a C compiler, see widedeep.fused), and with ``torch``,
    its step in torch operations (widedeep.batched_grad), for comparison."""
    with num_threads(1):  # the thread count a run gives such a stack (the fused step needs 1)
        trainer, stacked = _trainer(lecture, k, preset="lecture")
        if step == "torch":
            trainer.manual = ManualStep.create(trainer.layout, trainer.act)
        benchmark(trainer.epoch, stacked)
    _fill(benchmark, k=k, n=len(lecture.y), widths=(6, 4), features=8, threads=1)
    info = benchmark.extra_info
    info["step"] = type(trainer.manual).__name__
    if "us_per_model_epoch" in info and "lecture" in plain_us:
        info["plain_us_per_epoch"] = plain_us["lecture"]
        info["speedup_vs_plain"] = plain_us["lecture"] / info["us_per_model_epoch"]


@pytest.mark.parametrize("width", [pytest.param(512, marks=pytest.mark.quick), 1024])
@bench_mark("cpu")
def test_wide_batched(benchmark, peak_gflops, width):
    """One full-batch epoch of K wide nets (2 hidden layers, ReLU): share of matmul peak."""
    g = torch.Generator().manual_seed(0)
    train = Split(torch.randn(WIDE_ROWS, WIDE_FEATURES, generator=g),
                  torch.randint(0, 2, (WIDE_ROWS,), generator=g))
    trainer, stacked = _trainer(train, WIDE_K, widths=(width, width), activation="relu")
    benchmark(trainer.epoch, stacked)
    _fill(benchmark, k=WIDE_K, n=WIDE_ROWS, widths=(width, width), features=WIDE_FEATURES,
          threads=torch.get_num_threads(), peak=peak_gflops.get("cpu"))


def _fill(benchmark, *, k: int, n: int, widths: tuple[int, ...], features: int,
          threads: int, peak: float | None = None) -> None:
    flops = k * mlp_flops(mlp_sizes(features, widths, 1), n)
    fill_extra_info(benchmark, kind="batched" if k > 1 else "plain", device="cpu", samples=k * n,
                    flops=flops, peak=peak, models=k, widths=list(widths), threads=threads)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["us_per_model_epoch"] = stats.stats.median * 1e6 / k
