"""Training throughput (samples/s) of one optimiser step, across device, depth, width, batch
size and activation, with three references measured in the same run: the machine's matmul
peak, the lecture's plain training loop and scikit-learn's MLPClassifier, per epoch.

Run ``pytest bench/ -m quick`` for the quick subset, ``pytest bench/`` for the full grid.
Every timed call is one step (or one epoch) on data already on the device; the loss stays on
the device (no ``.item()``); CUDA timings synchronise before reading the clock.
"""

from __future__ import annotations

import itertools
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bench.harness import (
    device_params,
    fill_extra_info,
    mlp_flops,
    mlp_sizes,
    skip_unless_device,
    step_flops,
)
from widedeep.config import make_config
from widedeep.errors import UserError
from widedeep.model import build_model, count_parameters
from widedeep.train import criterion_for, make_optimizer, train_step

N_ROWS, N_FEATURES = 759, 8  # the lecture's diabetes table
DEPTHS = (1, 2, 4, 8, 16, 32)
WIDTHS = (8, 64, 256, 1024, 4096)
BATCHES = (64, 256, "full")
QUICK = dict(depth=(1, 4, 16), width=(8, 64, 256, 1024), batch=(64, "full"))
ACTIVATIONS = ("relu", "tanh", "sigmoid", "gelu", "selu")
ACT_SHAPE = dict(depth=4, width=256)  # where activations are compared, full batch
# NOTE: CPU steps above this many FLOPs are skipped (e.g. width 4096 at depth >= 2 takes
# seconds to minutes per step on 2 cores); raise it with $WIDEDEEP_BENCH_CPU_MAX_GFLOP.
CPU_MAX_GFLOP = float(os.environ.get("WIDEDEEP_BENCH_CPU_MAX_GFLOP", "100"))
PEAK_N = {"cpu": 2048, "cuda": 8192}  # square float32 matmul size per device


def grid_params() -> list:
    """(depth, width, batch) params; the quick subset carries the ``quick`` mark."""
    out = []
    for d, w, b in itertools.product(DEPTHS, WIDTHS, BATCHES):
        quick = d in QUICK["depth"] and w in QUICK["width"] and b in QUICK["batch"]
        out.append(pytest.param(d, w, b, id=f"d{d}-w{w}-b{b}",
                                marks=[pytest.mark.quick] if quick else []))
    return out


def synthetic(device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rows of the lecture's shape, already on ``device``: X (759, 8), y (759,)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N_ROWS, N_FEATURES, generator=g)
    y = torch.randint(0, 2, (N_ROWS,), generator=g)
    return X.to(device), y.to(device)


def diabetes() -> tuple[np.ndarray, np.ndarray]:
    """The real lecture file as X (759, 8) float32, y (759,) int64; skips when unavailable."""
    try:
        from widedeep.data import load_dataset
        data = load_dataset("diabetes")
    except (ImportError, UserError, OSError) as exc:
        pytest.skip(f"the lecture file is not available ({exc}); set WIDEDEEP_DATA")
    return data.X, data.y


def batch_rows(batch) -> int:
    return N_ROWS if batch == "full" else int(batch)


def bench_step(benchmark, peak_gflops, device: str, *, depth: int, width: int, batch,
               activation: str) -> None:
    """Time one library train_step and record its throughput."""
    skip_unless_device(device)
    config = make_config(depth=depth, width=width, activation=activation, optimizer="sgd",
                         lr=0.1, batch_size=None if batch == "full" else batch, device=device)
    n = batch_rows(batch)
    flops = mlp_flops(mlp_sizes(N_FEATURES, config.widths, 1), n)  # before building: size
    if device == "cpu" and flops > CPU_MAX_GFLOP * 1e9:
        pytest.skip(f"{flops / 1e9:.0f} GFLOP per step is over the CPU cap of {CPU_MAX_GFLOP:g} "
                    "(WIDEDEEP_BENCH_CPU_MAX_GFLOP); run it on CUDA")
    model = build_model(config, N_FEATURES, 2).to(device)
    assert step_flops(model, n) == flops
    X, y = synthetic(device)
    X, y = X[:n].contiguous(), y[:n].contiguous()  # (n, 8), (n,): the batch, on the device
    criterion, optimizer = criterion_for(2), make_optimizer(config, model.parameters())
    benchmark(train_step, model, X, y, criterion, optimizer)
    fill_extra_info(benchmark, kind="step", device=device, samples=n, flops=flops,
                    peak=peak_gflops.get(device), depth=depth, width=width, batch_size=n,
                    full_batch=batch == "full", activation=activation,
                    n_params=count_parameters(model))


# ------------------------------------------------------------------ references


@pytest.mark.parametrize("device", device_params())
def test_matmul_peak(benchmark, peak_gflops, device):
    """The machine's float32 matmul rate: a large square torch.mm."""
    skip_unless_device(device)
    n = PEAK_N[device]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))  # (n, n) each
    out = torch.empty(n, n, device=device)
    benchmark(torch.mm, a, b, out=out)
    flops = 2 * n**3
    fill_extra_info(benchmark, kind="peak", device=device, samples=None, flops=flops, matmul_n=n)
    if "gflops_per_s" in benchmark.extra_info:
        peak_gflops[device] = benchmark.extra_info["gflops_per_s"]
        benchmark.extra_info["peak_gflops_per_s"] = peak_gflops[device]
        benchmark.extra_info["fraction_of_peak"] = 1.0


def lecture_model() -> nn.Module:
    # NOTE: written as the lecture writes it (sigmoid output + BCELoss), not through the
    # library, so the library's own step can be compared with it.
    return nn.Sequential(nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Sigmoid(),
                         nn.Linear(4, 1), nn.Sigmoid())


@pytest.mark.quick
@pytest.mark.benchmark(warmup=True, warmup_iterations=3)
def test_lecture_loop(benchmark, peak_gflops):
    """One epoch of the lecture's loop: 8-6-4-1 sigmoid, BCE, SGD lr 0.1, full batch."""
    X, y = diabetes()
    torch.manual_seed(0)
    x_data, y_data = torch.from_numpy(X), torch.from_numpy(y).float()[:, None]  # (759,8) (759,1)
    model, criterion = lecture_model(), nn.BCELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def epoch():
        # NOTE: the lecture prints loss.item() every epoch; left out (a host sync per epoch).
        loss = criterion(model(x_data), y_data)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    benchmark(epoch)
    flops = mlp_flops([(8, 6), (6, 4), (4, 1)], len(X))
    fill_extra_info(benchmark, kind="lecture", device="cpu", samples=len(X), flops=flops,
                    peak=peak_gflops.get("cpu"), depth=2, width=6, batch_size=len(X),
                    full_batch=True, activation="sigmoid", n_params=count_parameters(model))


@pytest.mark.quick
@pytest.mark.benchmark(warmup=True, warmup_iterations=3)
def test_library_lecture(benchmark, peak_gflops):
    """The same epoch through the library (preset ``lecture``: linear head, BCE-with-logits)."""
    X, y = diabetes()
    config = make_config(preset="lecture", device="cpu")
    model = build_model(config, X.shape[1], 2)
    criterion, optimizer = criterion_for(2), make_optimizer(config, model.parameters())
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y)  # (759, 8), (759,)
    benchmark(train_step, model, X_t, y_t, criterion, optimizer)
    fill_extra_info(benchmark, kind="library-lecture", device="cpu", samples=len(X),
                    flops=step_flops(model, len(X)), peak=peak_gflops.get("cpu"), depth=2,
                    width=6, batch_size=len(X), full_batch=True, activation="sigmoid",
                    n_params=count_parameters(model))


@pytest.mark.quick
@pytest.mark.benchmark(warmup=True, warmup_iterations=3)
def test_sklearn_epoch(benchmark, peak_gflops):
    """One epoch of scikit-learn's MLPClassifier on the same rows and the same recipe."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    X, y = diabetes()
    clf = MLPClassifier(hidden_layer_sizes=(6, 4), activation="logistic", solver="sgd",
                        learning_rate_init=0.1, momentum=0.0, alpha=0.0, batch_size=len(X),
                        shuffle=False, random_state=0)
    classes = np.unique(y)

    def epoch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.partial_fit(X, y, classes=classes)  # one pass = one full-batch step

    benchmark(epoch)
    flops = mlp_flops([(8, 6), (6, 4), (4, 1)], len(X))
    fill_extra_info(benchmark, kind="sklearn", device="cpu", samples=len(X), flops=flops,
                    peak=peak_gflops.get("cpu"), depth=2, width=6, batch_size=len(X),
                    full_batch=True, activation="sigmoid")


# ------------------------------------------------------------------ the grid


@pytest.mark.parametrize("device", device_params(quick=False))
@pytest.mark.parametrize("depth,width,batch", grid_params())
def test_step(benchmark, peak_gflops, device, depth, width, batch):
    """One SGD step of a ReLU MLP: full batch (759 rows) or one mini-batch."""
    bench_step(benchmark, peak_gflops, device, depth=depth, width=width, batch=batch,
               activation="relu")


@pytest.mark.quick
@pytest.mark.parametrize("device", device_params(quick=False))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_step(benchmark, peak_gflops, device, activation):
    """One full-batch step at depth 4, width 256, for a few activations."""
    bench_step(benchmark, peak_gflops, device, batch="full", activation=activation, **ACT_SHAPE)
