"""Batched engine, part 4: the full-batch training step captured in a CUDA graph.

Small nets are launch-bound on a GPU: a step is a few dozen tiny kernels, each costing more
to launch than to run. Captured once, a step replays as one graph launch. Only full-batch
steps are captured (mini-batches would need their indices copied into static buffers).

NOTE: written without a GPU at hand (the session that wrote it had none); the test that
checks graph replays against eager steps skips without CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 3  # eager steps on a side stream before capture, as torch.cuda.graphs asks


def can_capture(trainer, data) -> bool:
    """Full-batch training with everything on one CUDA device."""
    full = trainer.batch_size is None or trainer.batch_size >= data.n
    # NOTE: batch norm's running statistics are updated in place outside the step's tensors
    return full and trainer.flat.is_cuda and data.X.is_cuda and trainer.norms is None


def capture_step(trainer, data) -> Callable[[], torch.Tensor]:
    """A function that replays one training step of ``trainer`` on ``data``; returns the
    (K,) pre-update losses (a fresh tensor). Warm-up steps are undone: capturing leaves the
    models and optimiser state as they were."""
    state = _state(trainer)
    saved = [t.clone() for t in state]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            trainer.step(data)
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(state, saved, strict=True):
        t.copy_(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = trainer.step(data)  # recorded, not run

    def replay() -> torch.Tensor:
        graph.replay()
        return static_loss.clone()  # the next replay overwrites static_loss

    return replay


def _state(trainer) -> list[torch.Tensor]:
    """Every tensor a step updates in place: parameters and optimiser state."""
    opt = trainer.opt
    return [t for t in (trainer.flat, opt.buf, opt.sq, opt.t) if t is not None]
