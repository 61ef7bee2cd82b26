"""The batched engine's hand-written gradients against autograd's, for every activation the
registry builds, two-class and multi-class, shared and per-model data, with shortcuts."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from widedeep import env, fused
from widedeep.activations import get_activation, list_activations
from widedeep.batched_fit import Data, Trainer
from widedeep.batched_grad import ManualStep
from widedeep.config import make_config
from widedeep.model import build_model

K, N, D = 3, 50, 5
MANUAL = [a for a in list_activations() if get_activation(a).elementwise]


def _trainer(activation: str, n_classes: int, **options) -> Trainer:
    configs = [make_config(activation=activation, seed=s, **options) for s in range(K)]
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, D, n_classes))
    return Trainer(models, configs)


def _data(n_classes: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (D, N) if shared else (K, D, N)
    X = torch.randn(shape, generator=g) * 2  # spread out: reach every branch of each kink
    y = torch.randint(0, n_classes, shape[:-2] + (N,), generator=g)
    return X, y


@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("activation", MANUAL)
def test_manual_gradients_equal_autograd(activation, n_classes, shared):
    trainer = _trainer(activation, n_classes, widths=(6, 6, 4), residual=True)
    assert trainer.manual is not None, f"{activation} has no hand-written derivative"
    X, y = _data(n_classes, shared)
    with trainer.act.drawing(trainer.forks([True] * K)):  # rrelu: the same slopes for both
        want_loss, want_grad = trainer.autograd(Data(X, y))
    with trainer.act.drawing(trainer.forks([True] * K)):
        loss, grad = trainer.manual(trainer.flat, X, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0  # something flowed back


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("activation", ["tanh", "selu", "prelu", "gelu"])
def test_manual_gradients_with_dropout_equal_autograd(activation, n_classes):
    """Dropout (alpha dropout after selu) after each activation, with and without shortcuts."""
    for residual in (False, True):
        trainer = _trainer(activation, n_classes, widths=(6, 6, 4), residual=residual,
                           dropout=0.4)
        X, y = _data(n_classes, shared=True)
        with trainer.act.drawing(trainer.forks([True] * K)):  # the same masks for both
            want_loss, want_grad = trainer.autograd(Data(X, y))
        with trainer.act.drawing(trainer.forks([True] * K)):
            loss, grad = trainer.manual(trainer.flat, X, y)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
        other = [torch.Generator().manual_seed(99 + k) for k in range(K)]  # other masks
        with trainer.act.drawing(other):
            assert not torch.equal(trainer.manual(trainer.flat, X, y)[1], grad)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("cross", [False, True])
def test_manual_gradients_of_wide_and_deep_equal_autograd(cross, n_classes, shared):
    """The wide part's weights get their gradient from the logits' (crossed features too)."""
    configs = [make_config(arch="widedeep", cross=cross, activation="relu", widths=(6, 4),
                           seed=s) for s in range(K)]
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, D, n_classes))
    trainer = Trainer(models, configs)
    assert trainer.layout.wide and trainer.layout.cross == cross
    X, y = _data(n_classes, shared)
    want_loss, want_grad = trainer.autograd(Data(X, y))
    loss, grad = trainer.manual(trainer.flat, X, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    wide = trainer.layout.views(grad)["wide.weight"]
    assert wide.shape[-1] == D + (D * (D - 1) // 2 if cross else 0) and wide.abs().sum() > 0


@pytest.mark.parametrize("options", [dict(activation="softmax"), dict(activation="softmin"),
                                     dict(activation="tanh", norm="layer")],
                         ids=["softmax", "softmin", "layer-norm"])
def test_what_the_hand_written_step_does_not_cover_keeps_autograd(options, monkeypatch):
    monkeypatch.setattr(fused, "library", lambda: None)  # no compiled step (see test_fused)
    trainer = _trainer(n_classes=2, **options)
    assert trainer.manual is None
    assert ManualStep.create(trainer.layout, trainer.act) is None


def _retains(**extra_env: str) -> str:
    """What a fresh process's retain_freed_memory() returns under extra_env."""
    code = "from widedeep import env; print(env.retain_freed_memory(), env.environment()" \
           "['malloc_retains_freed'])"
    environ = {k: v for k, v in os.environ.items() if k not in env._MALLOC_ENV} | extra_env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_engine_keeps_freed_memory_unless_the_user_tuned_malloc():
    assert _retains() == "True True"
    assert _retains(MALLOC_TRIM_THRESHOLD_="0") == "False False"
