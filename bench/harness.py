"""Helpers shared by the benchmark modules (bench/test_throughput.py, bench/test_batched.py,
bench/test_sweep_command.py, bench/test_search_trials.py): the device's timer and warm-up
mark, analytic FLOP counts and the ``extra_info`` fillers.

Import them as ``from bench.harness import ...``; the ``peak_gflops`` fixture (this run's
matmul GFLOP/s per device) lives in bench/conftest.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from widedeep.model import layer_sizes, linear_layers
from widedeep.model import step_flops as model_step_flops

WARMUP_ITERATIONS = 3  # untimed calls before calibration: allocator, cuBLAS handles, caches

# ------------------------------------------------------------------ timing


def cuda_timer() -> float:
    """perf_counter after draining the GPU queue: kernels launched before it are counted."""
    torch.cuda.synchronize()
    return time.perf_counter()


def timer_for(device: str) -> Callable[[], float]:
    """The clock a benchmark on ``device`` must use (CUDA launches are asynchronous)."""
    return cuda_timer if device == "cuda" else time.perf_counter


def bench_mark(device: str) -> pytest.MarkDecorator:
    """``@pytest.mark.benchmark`` with the device's timer and warm-up rounds."""
    return pytest.mark.benchmark(timer=timer_for(device), warmup=True,
                                 warmup_iterations=WARMUP_ITERATIONS)


def skip_unless_device(device: str) -> None:
    """Skip the current test, with the reason, when ``device`` is not usable here."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"CUDA is not available (torch {torch.__version__}, no GPU visible): "
                    "run the CUDA benchmarks on a GPU machine")


def device_params(quick: bool = True) -> list:
    """``cpu`` and ``cuda`` as params, each carrying its timer mark."""
    marks = [pytest.mark.quick] if quick else []
    return [pytest.param(d, id=d, marks=[bench_mark(d), *marks]) for d in ("cpu", "cuda")]


# ------------------------------------------------------------------ FLOPs


# NOTE: the FLOP count is the library's, so benchmarks and the thread policy agree.
mlp_flops = model_step_flops
mlp_sizes = layer_sizes


def step_flops(model: nn.Module, n: int) -> int:
    """:func:`mlp_flops` for a library model's deep path on ``n`` rows."""
    sizes = [(layer.in_features, layer.out_features) for _, layer in linear_layers(model)]
    return mlp_flops(sizes, n)


# ------------------------------------------------------------------ extra_info


def fill_extra_info(benchmark, *, kind: str, device: str, samples: int | None, flops: int,
                    peak: float | None = None, **fields) -> None:
    """Record throughput in ``benchmark.extra_info`` from the median time of one call.

    ``samples``: rows per call (None for the matmul peak); ``flops``: analytic FLOPs per
    call; ``peak``: this run's matmul GFLOP/s on ``device`` (None if not measured yet).
    Without timing (``--benchmark-disable``) only the static fields are recorded.
    """
    info = benchmark.extra_info
    info.update(kind=kind, device=device, samples_per_call=samples, flops_per_step=flops,
                **fields)
    stats = getattr(benchmark, "stats", None)
    if stats is None:
        return
    median = stats.stats.median  # seconds per call
    gflops = flops / median / 1e9
    info.update(samples_per_s=samples / median if samples else None, gflops_per_s=gflops,
                peak_gflops_per_s=peak, fraction_of_peak=gflops / peak if peak else None)


def fill_engine_run(benchmark, plain_s: dict[str, float], *, kind: str, engine: str,
                    **info) -> None:
    """``extra_info`` of a many-runs case timed per engine, plain first: its kind, engine and
    ``info``, median ``seconds``, and for the other engines ``speedup_vs_plain`` over the
    plain case of this run (whose median ``plain_s`` keeps)."""
    benchmark.extra_info.update(kind=kind, device="cpu", engine=engine, **info)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # untimed (--benchmark-disable)
        return
    median = stats.stats.median
    benchmark.extra_info["seconds"] = median
    if engine == "plain":
        plain_s["median"] = median
    elif "median" in plain_s:
        benchmark.extra_info.update(plain_seconds=plain_s["median"],
                                    speedup_vs_plain=plain_s["median"] / median)
