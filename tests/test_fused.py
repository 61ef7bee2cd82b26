"""The compiled step (widedeep/_fused.c) against autograd, where it applies; what happens
where it does not, or where it cannot be built."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from widedeep import batched, fused
from widedeep.batched_fit import Data, Trainer
from widedeep.batched_grad import ManualStep
from widedeep.config import make_config
from widedeep.model import build_model
from widedeep.run import num_threads

D = 5
HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler: the fused step is off")


@pytest.fixture(autouse=True)
def _one_thread():
    """The thread count a run gives small stacks, and the one the fused step runs on."""
    with num_threads(1):
        yield


def _trainer(k: int, n_classes: int, **options) -> Trainer:
    configs = [make_config(seed=s, **options) for s in range(k)]
    models = []
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, D, n_classes))
    return Trainer(models, configs)


def _data(k: int, n: int, n_classes: int, shared: bool, scale: float = 2.0):
    g = torch.Generator().manual_seed(1)
    shape = (D, n) if shared else (k, D, n)
    X = torch.randn(shape, generator=g) * scale
    y = torch.randint(0, n_classes, shape[:-2] + (n,), generator=g)
    return X, y


def _matches_autograd(trainer: Trainer, X: torch.Tensor, y: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Assert the trainer's step gives autograd's losses and gradients; returns them."""
    want_loss, want_grad = trainer.autograd(Data(X, y))
    loss, grad = trainer.manual(trainer.flat, X, y)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    return loss, grad


@needs_kernel
def test_the_kernel_builds_where_there_is_a_compiler():
    assert fused.library() is not None, fused.status()
    assert fused.status() == "compiled"


def _compiler_targets_avx512() -> bool | None:
    """Whether the C compiler's -march=native means AVX-512; None where it cannot say."""
    cc = os.environ.get("CC") or "cc"
    out = subprocess.run([cc, "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                         capture_output=True, text=True)
    return "__AVX512F__" in out.stdout if out.returncode == 0 else None


@needs_kernel
def test_the_kernel_takes_the_vectors_the_cpu_has():
    # NOTE: 16-float vectors on a CPU without AVX-512 still build and give the same
    # gradients, but each operation is split in two: a step ~10x slower and a build ~10x
    # longer (AMD EPYC, AVX2). Only the vector width can tell.
    avx512 = _compiler_targets_avx512()
    if avx512 is None:
        pytest.skip("the compiler does not know -march=native")
    assert fused.library() is not None, fused.status()
    assert fused.lanes() == (16 if avx512 else 8)
    from widedeep.env import environment

    assert environment()["fused_lanes"] == fused.lanes()


@needs_kernel
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
# rows: fewer than one vector, exactly two, a ragged tail after several, and enough for
# whole register blocks of row chunks, a tail of chunks and the padded (odd) row stride
@pytest.mark.parametrize("n", [1, 32, 77, 245])
def test_fused_gradients_equal_autograd(activation, n_classes, shared, n):
    trainer = _trainer(4, n_classes, activation=activation, widths=(7, 16, 3))
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(4, n, n_classes, shared)
    _, grad = _matches_autograd(trainer, X, y)
    assert grad.abs().sum() > 0


@needs_kernel
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
@pytest.mark.parametrize("widths", [(7, 7, 7, 16, 16, 3), (5, 9, 9)],
                         ids=["residual-runs", "input-sized-first"])
def test_fused_gradients_of_residual_blocks_equal_autograd(activation, n_classes, shared,
                                                           widths):
    """Residual blocks wherever a layer has as many units as inputs: two in a row, one
    after a plain layer, one before the head, and the first layer on the D inputs."""
    trainer = _trainer(3, n_classes, activation=activation, widths=widths, residual=True)
    assert any(trainer.layout.residual) and not all(trainer.layout.residual)
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(3, 77, n_classes, shared)
    _matches_autograd(trainer, X, y)


@needs_kernel
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("n_classes", [2, 3, 10])
@pytest.mark.parametrize("cross", [False, True], ids=["wide", "wide-crossed"])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "softmax"])
def test_fused_gradients_of_wide_and_deep_equal_autograd(activation, cross, n_classes, shared):
    """Wide & Deep: the wide part's logits (on the features, or on them and their products)
    added to the deep part's, residual blocks in the deep part."""
    trainer = _trainer(3, n_classes, activation=activation, widths=(6, 6, 9), residual=True,
                       arch="widedeep", cross=cross)
    assert trainer.layout.wide and isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(3, 77, n_classes, shared)
    _, grad = _matches_autograd(trainer, X, y)
    wide = trainer.layout.views(grad)["wide.weight"]
    assert wide.shape[-1] == D + (D * (D - 1) // 2 if cross else 0) and (wide != 0).all()


@needs_kernel
@pytest.mark.parametrize("arch", ["mlp", "widedeep"])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ["relu", "selu", "sigmoid", "prelu", "softmax"])
@pytest.mark.parametrize("draw", ["compiled", "torch"])
def test_fused_dropout_draws_the_masks_autograd_draws(draw, activation, residual, arch,
                                                      monkeypatch):
    """Dropout (alpha dropout after selu): each model's masks drawn from its own stream, layer
    by layer, as the other steps draw them (the middle model is evaluated: no dropout); by
    the compiled draw, and by torch's where that does not know torch's generator."""
    if draw == "torch":
        monkeypatch.setitem(fused._masks_checked, id(fused.library()), False)
    trainer = _trainer(3, 3, activation=activation, widths=(7, 7, 16), residual=residual,
                       dropout=0.3, arch=arch)
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(3, 77, 3, shared=True)

    def streams():
        return [torch.Generator().manual_seed(10), None, torch.Generator().manual_seed(12)]

    with trainer.act.drawing(streams()):
        loss, grad = trainer.manual(trainer.flat, X, y)
    with trainer.act.drawing(streams()):
        want_loss, want_grad = trainer.autograd(Data(X, y))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    with trainer.act.drawing(None):  # no streams: evaluated, nothing dropped
        undropped, _ = trainer.manual(trainer.flat, X, y)
    assert (undropped != loss).tolist() == [True, False, True]


@needs_kernel
@pytest.mark.parametrize("options", [
    dict(), dict(residual=True), dict(norm="layer"), dict(arch="widedeep", cross=True),
], ids=["plain", "residual", "layer-norm", "widedeep"])
@pytest.mark.parametrize("n", [1, 32, 77])
def test_fused_rrelu_draws_the_slopes_autograd_draws(options, n):
    """rrelu: each model's slopes drawn in the compiled step from its own stream, layer by
    layer as torch's rrelu draws them (the middle model is evaluated: the mean slope); the
    same losses and gradients as autograd's step, and each stream left where it leaves it."""
    trainer = _trainer(3, 3, activation="rrelu", widths=(7, 7, 16), **options)
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(3, n, 3, shared=False)

    def streams():
        return [torch.Generator().manual_seed(10), None, torch.Generator().manual_seed(12)]

    ours, theirs = streams(), streams()
    for _ in range(2):  # the second step draws on from where the first left the streams
        with trainer.act.drawing(ours):
            loss, grad = trainer.manual(trainer.flat, X, y)
        with trainer.act.drawing(theirs):
            want_loss, want_grad = trainer.autograd(Data(X, y))
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
        for g, h in zip(ours, theirs, strict=True):
            assert g is None or torch.equal(g.get_state(), h.get_state())
    assert not torch.equal(ours[0].get_state(), streams()[0].get_state())  # it drew
    with trainer.act.drawing(None):  # no streams: every model evaluated
        evaluated, _ = trainer.manual(trainer.flat, X, y)
    assert (evaluated != loss).tolist() == [True, False, True]


@needs_kernel
@pytest.mark.parametrize("used", [0, 1, 623, 5000], ids=lambda u: f"used{u}")
@pytest.mark.parametrize("shape", [(1, 1), (37, 41), (300, 7)])
def test_compiled_rrelu_slopes_are_torchs(shape, used):
    """The compiled draw against torch's rrelu_with_noise: the same slopes (1 above zero and
    at NaN), and the generator left where torch leaves it, from a fresh generator and one a
    draw or a whole mt19937 block into its stream, twice in a row."""
    lib = fused.library()
    module = nn.RReLU()
    z = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    z.view(-1)[:3] = torch.tensor([0.0, float("nan"), -0.0])[:z.numel()]
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for g in (ours, theirs):
        torch.empty(used).uniform_(generator=g)
    for _ in range(2):
        want = torch.empty_like(z)
        torch._C._nn.rrelu_with_noise(z, want, module.lower, module.upper, True, theirs)
        got = fused.rrelu_slopes(lib, z, module.lower, module.upper, ours)
        assert torch.equal(got, want)
        assert torch.equal(ours.get_state(), theirs.get_state())
    below = z <= 0
    if below.sum() > 1:
        assert got[below].unique().numel() > 1  # drawn, not one slope
    assert torch.equal(got[~below], torch.ones_like(got[~below]))


def test_where_the_rrelu_draw_is_not_torchs_the_torch_step_runs(monkeypatch):
    """A torch whose rrelu draws the compiled step does not know keeps the torch-ops step."""
    if fused.library() is None:
        pytest.skip(f"no compiled step here ({fused.status()})")
    monkeypatch.setitem(fused._slopes_checked, id(fused.library()), False)
    trainer = _trainer(2, 2, activation="rrelu")
    assert not isinstance(trainer.manual, fused.FusedStep)
    monkeypatch.setitem(fused._slopes_checked, id(fused.library()), True)
    assert isinstance(_trainer(2, 2, activation="rrelu").manual, fused.FusedStep)


@needs_kernel
@pytest.mark.parametrize("alpha", [False, True], ids=["dropout", "alpha-dropout"])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
@pytest.mark.parametrize("used", [0, 1, 623, 5000], ids=lambda u: f"used{u}")
def test_compiled_dropout_masks_are_torchs(used, p, alpha):
    """The compiled draw against torch's bernoulli_ (dropout_masks): the same factors and
    shifts, and each generator left where torch leaves it, from a fresh generator, one a
    draw or a whole mt19937 block into its stream, with layers whose draws cross refills,
    a ragged last block of rows, and a model without a stream between two with one."""
    lib = fused.library()
    widths, n = [5, 300, 1, 64], 37

    def streams():
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        for g in gens:
            torch.empty(used).uniform_(generator=g)
        return [gens[0], None, gens[1]]

    ours, theirs = streams(), streams()
    out = None
    for _ in range(2):  # the second starts where the first left the generators, in its tensors
        noise, shift = fused.draw_masks(lib, widths, n, p, alpha, ours, out)
        if out is not None:
            assert noise.data_ptr() == out[0].data_ptr()
            assert shift is None or shift.data_ptr() == out[1].data_ptr()
        out = noise, shift
        want = [batched.dropout_masks(w, n, p, alpha, theirs, torch.device("cpu"))
                for w in widths]
        assert torch.equal(noise, torch.cat([m[0] for m in want], 1))
        assert (shift is None) == (not alpha)
        if alpha:
            assert torch.equal(shift, torch.cat([m[1] for m in want], 1))
        for g, h in zip(ours, theirs, strict=True):
            assert g is None or torch.equal(g.get_state(), h.get_state())
    assert 0 < (noise[0] != noise[0, 0, 0]).sum() < noise[0].numel()  # both values drawn
    assert torch.equal(noise[1], torch.ones_like(noise[1]))  # no stream: nothing dropped


@needs_kernel
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("options", [{}, dict(residual=True), dict(arch="widedeep", cross=True)],
                         ids=["plain", "residual", "wide"])
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
def test_fused_layer_norm_gradients_equal_autograd(activation, options, n_classes):
    """Layer norm between each hidden layer's product and its activation, its weight and bias
    per layer (set apart from 1 and 0, so that both count)."""
    trainer = _trainer(3, n_classes, activation=activation, widths=(7, 7, 16), norm="layer",
                       **options)
    assert isinstance(trainer.manual, fused.FusedStep)
    g = torch.Generator().manual_seed(3)
    offsets = trainer.layout.offsets()
    for name, shape in zip(trainer.layout.names, trainer.layout.shapes, strict=True):
        if ".norm." in name:
            columns = slice(offsets[name], offsets[name] + shape[0])
            trainer.flat[:, columns] += 0.3 * torch.randn(3, shape[0], generator=g)
    X, y = _data(3, 77, n_classes, shared=False)
    _matches_autograd(trainer, X, y)


@needs_kernel
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("activation", ["relu", "gelu", "prelu"])
# mini-batch sizes: one row chunk (1, 16), two (32), a ragged five (77), the most taking the
# transposed weight gradient (128: 8 chunks) and one more chunk than that (129)
@pytest.mark.parametrize("n", [1, 16, 32, 77, 128, 129])
def test_fused_gradients_of_small_batches_equal_autograd(activation, n_classes, n):
    """Few row chunks: the products' wide blocks of outputs (40 outputs: a block of 24 and
    four of 4 on one chunk; 112: nine of 12 and one of 4 on two), and weight gradients
    through the transposed inputs where a layer has whole vectors of them (112: a block of 6
    and one of 1; 32, 16) beside ones that have not (40, and Wide & Deep's wide part on 5
    features)."""
    trainer = _trainer(2, n_classes, activation=activation, widths=(40, 112, 32, 16),
                       arch="widedeep")
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(2, n, n_classes, shared=False)
    _matches_autograd(trainer, X, y)


@needs_kernel
@pytest.mark.parametrize("activation", ["tanh", "gelu", "logsoftmax"])
def test_fused_gradients_at_the_widest_layers_it_takes(activation):
    trainer = _trainer(2, 3, activation=activation, widths=(fused.MAX_WIDTH, fused.MAX_WIDTH))
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(2, 245, 3, shared=False)
    _matches_autograd(trainer, X, y)


@needs_kernel
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", ["hardswish", "hardsigmoid", "softshrink", "softsign",
                                        "threshold", "prelu", "gelu"])
def test_fused_gradients_of_nets_keeping_more_than_the_caches_hold(activation, residual):
    """8 x 64 units on 607 rows keep 1.3 MB of pre-activations per model: past
    STREAM_BYTES, the kernel writes them around the caches (the cheap activations)."""
    trainer = _trainer(2, 2, activation=activation, widths=(64,) * 8, residual=residual)
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(2, 607, 2, shared=True)
    _matches_autograd(trainer, X, y)


@needs_kernel
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("weight_scale", [30.0, 1e6])
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
def test_saturated_units_and_huge_logits_match_autograd(activation, weight_scale, n_classes):
    """Inputs far out on the activations' tails, and logits far beyond exp's float range
    (as after one step at a learning rate that makes a net diverge): finite, and close to
    float64 autograd. NOTE: at these magnitudes float32 logits carry errors of ~1e-6 of their
    scale, so two float32 implementations differ at that level, not at a few ulps."""
    trainer = _trainer(3, n_classes, activation=activation, widths=(6, 4))
    trainer.flat.mul_(weight_scale)
    X, y = _data(3, 40, n_classes, True, scale=50.0)
    loss, grad = trainer.manual(trainer.flat, X, y)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    flat64 = trainer.flat.double().requires_grad_(True)
    loss64 = trainer.losses(flat64, Data(X.double(), y))
    (grad64,) = torch.autograd.grad(loss64.sum(), flat64)
    for ours, exact in ((loss, loss64), (grad, grad64)):
        torch.testing.assert_close(ours.double(), exact.detach(), rtol=1e-3,
                                   atol=1e-5 * exact.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("activation", fused.ACTIVATIONS)
def test_a_nan_weight_spoils_its_own_model_as_in_torch(activation):
    """Divergence detection sees what the torch step would show it: a NaN weight reaches its
    model's loss and gradient, and never another model's."""
    trainer = _trainer(3, 2, activation=activation, widths=(6, 4))
    trainer.flat[1, 0] = float("nan")
    X, y = _data(3, 40, 2, True)
    loss, grad = trainer.manual(trainer.flat, X, y)
    want_loss, want_grad = trainer.autograd(Data(X, y))
    assert torch.equal(torch.isnan(loss), torch.isnan(want_loss))
    assert torch.equal(torch.isnan(grad).any(1), torch.isnan(want_grad).any(1))
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).any()
    assert torch.isfinite(loss[[0, 2]]).all() and torch.isfinite(grad[[0, 2]]).all()


@pytest.mark.parametrize("options", [
    dict(activation="rrelu", dropout=0.2), dict(activation="relu", widths=(fused.MAX_WIDTH + 1,)),
], ids=["rrelu-dropout", "too-wide"])
def test_where_the_fused_step_does_not_apply_the_torch_step_runs(options):
    trainer = _trainer(2, 2, **options)
    assert fused.FusedStep.create(trainer.layout, trainer.flat.device, 2, trainer.act) is None
    assert not isinstance(trainer.manual, fused.FusedStep)


def test_an_activation_the_kernel_lacks_takes_the_torch_step(monkeypatch):
    monkeypatch.setattr(fused, "ACTIVATIONS", [a for a in fused.ACTIVATIONS if a != "tanh"])
    trainer = _trainer(2, 2, activation="tanh")
    assert not isinstance(trainer.manual, fused.FusedStep)


@pytest.mark.parametrize("module", [nn.GELU(approximate="tanh"), nn.Softmax(dim=0),
                                    nn.LogSoftmax(dim=0), nn.PReLU(num_parameters=3)])
def test_modules_without_a_kernel_code(module):
    assert fused._code_of(module) is None


@needs_kernel
@pytest.mark.parametrize("widths", [(7, 16, 3), (fused.MAX_WIDTH, 9)], ids=["narrow", "wide"])
def test_prelu_slopes_per_model_and_layer_and_their_gradients(widths):
    """Each model's prelu layers have slopes of their own (negative and zero ones too), read
    from the parameters; their gradients equal autograd's."""
    trainer = _trainer(3, 3, activation="prelu", widths=widths)
    assert isinstance(trainer.manual, fused.FusedStep)
    offsets = trainer.layout.offsets()
    columns = [offsets[f"blocks.{i}.activation.weight"] for i in range(len(widths))]
    slopes = torch.tensor([[0.25, -0.5, 0.0], [1.5, 0.1, -2.0], [0.0, 0.3, 0.7]])
    trainer.flat[:, columns] = slopes[:, :len(widths)]
    X, y = _data(3, 77, 3, shared=False)
    loss, grad = _matches_autograd(trainer, X, y)
    assert (grad[:, columns] != 0).all()  # every slope gets a gradient
    assert len(set(loss.tolist())) == 3


def _in_child(extra_env: dict, cache) -> list[str]:
    """(status, step class) in a fresh process with its own empty cache."""
    code = ("import torch; torch.set_num_threads(1); from widedeep import fused; "
            "from tests.test_fused import _trainer; "
            "t = _trainer(2, 2, activation='sigmoid'); "
            "t.step(Data(*_data(2, 20, 2, True))); "  # it still trains
            "print(fused.status()); print(type(t.manual).__name__)")
    code = "from widedeep.batched_fit import Data; from tests.test_fused import _data; " + code
    environ = os.environ | {"WIDEDEEP_CACHE": str(cache)} | extra_env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.split()


def test_without_a_compiler_the_torch_step_runs(tmp_path):
    out = _in_child({"CC": "no-such-compiler"}, tmp_path)
    assert out[0] == "unavailable:" and "'no-such-compiler' not found" in " ".join(out)
    assert out[-1] == "ManualStep"


def test_widedeep_fused_0_turns_it_off(tmp_path):
    out = _in_child({"WIDEDEEP_FUSED": "0"}, tmp_path)
    assert out[:2] == ["off:", "WIDEDEEP_FUSED=0"] and out[-1] == "ManualStep"


@needs_kernel
def test_a_compiler_error_is_reported_not_raised(tmp_path):
    """A compiler that fails (here: one that rejects every flag) leaves the torch step."""
    fake = tmp_path / "badcc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bad 1.0; exit 0; fi\n"
                    "echo 'badcc: error: unsupported' >&2; exit 1\n")
    fake.chmod(0o755)
    out = _in_child({"CC": str(fake)}, tmp_path / "cache")
    assert out[0] == "unavailable:" and "badcc: error: unsupported" in " ".join(out)
    assert out[-1] == "ManualStep"


@needs_kernel
def test_the_step_leaves_denormals_as_it_found_them():
    """The kernel flushes denormals to zero while it runs, and only then."""
    tiny = torch.tensor([1e-40])
    assert (tiny * 1.0).item() != 0.0
    trainer = _trainer(2, 2, activation="gelu", widths=(6,))
    trainer.manual(trainer.flat, *_data(2, 20, 2, True))
    assert (tiny * 1.0).item() != 0.0


@needs_kernel
def test_fewer_models_than_threads_keep_the_torch_step():
    with num_threads(3):
        trainer = _trainer(2, 2, activation="relu")
    assert isinstance(trainer.manual, ManualStep)


@needs_kernel
@pytest.mark.parametrize("shared", [True, False], ids=["shared-rows", "own-rows"])
@pytest.mark.parametrize("activation", ["sigmoid", "prelu", "gelu"])
def test_models_split_between_threads_give_the_same_results(activation, shared):
    """With several torch threads the kernel splits the models between them (7 models on
    2 and 3 threads: uneven runs): each model's loss and gradient are the same bits."""
    with num_threads(3):
        trainer = _trainer(7, 3, activation=activation, widths=(9, 17))
    assert isinstance(trainer.manual, fused.FusedStep)
    X, y = _data(7, 77, 3, shared)
    with num_threads(1):
        want_loss, want_grad = trainer.manual(trainer.flat, X, y)
    for threads in (2, 3):
        with num_threads(threads):
            loss, grad = trainer.manual(trainer.flat, X, y)
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)
    want = trainer.autograd(Data(X, y))[1]
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


OPTIMIZER_CASES = [
    ("sgd", dict(momentum=0.0)), ("sgd", dict(momentum=0.9, weight_decay=0.01)),
    ("adam", {}), ("adam", dict(weight_decay=0.01)), ("adamw", dict(weight_decay=0.05)),
]


def _torch_optimizer(kind: str, param, lr: float, options: dict):
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls([param], lr=lr, **options)


@needs_kernel
@pytest.mark.parametrize("kind, options", OPTIMIZER_CASES)
def test_the_compiled_optimizer_step_follows_torch_optim(kind, options):
    """Three models with their own learning rates, 200 steps of random gradients: the
    compiled update and the torch-op update both stay with torch.optim, model by model."""
    from widedeep.batched import StackedOptimizer

    lrs, P = (0.1, 0.01, 0.003), 777
    g = torch.Generator().manual_seed(0)
    start = torch.randn(len(lrs), P, generator=g)
    configs = [make_config(optimizer=kind, lr=lr, **options) for lr in lrs]
    params = [nn.Parameter(start[k].clone()) for k in range(len(lrs))]
    refs = [_torch_optimizer(kind, p, lr, options) for p, lr in zip(params, lrs, strict=True)]
    compiled, by_ops = start.clone(), start.clone()
    opt_c, opt_t = StackedOptimizer(configs, compiled), StackedOptimizer(configs, by_ops)
    opt_t._compiled = False  # torch ops, as on CUDA
    for _ in range(200):
        grad = torch.randn(len(lrs), P, generator=g)
        for p, ref, row in zip(params, refs, grad, strict=True):
            p.grad = row.clone()
            ref.step()
        opt_c.step(compiled, grad)
        opt_t.step(by_ops, grad)
    assert isinstance(opt_c._compiled, fused.OptimizerStep)
    expected = torch.stack([p.detach() for p in params])
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(by_ops, expected, rtol=1e-5, atol=2e-5)
    assert not torch.equal(compiled, start)


@needs_kernel
def test_the_compiled_optimizer_step_declines_what_it_cannot_take():
    flat, column = torch.zeros(2, 8), torch.full((2, 1), 0.1)
    create = fused.OptimizerStep.create
    assert create("sgd", flat, flat.clone(), None, column, column, column) is not None
    assert create("adam", flat.double(), flat.double(), flat.double(), column, column,
                  column) is None
    assert create("sgd", torch.zeros(8, 2).t(), flat.clone(), None, column, column,
                  column) is None
    step = create("sgd", flat, flat.clone(), None, column, column, column)
    with pytest.raises(ValueError, match="bound to other parameters"):
        step(flat.clone(), torch.ones(2, 8), 1)
    assert torch.equal(flat, torch.zeros(2, 8))  # left untouched


@needs_kernel
def test_a_build_removes_builds_unused_for_a_month(tmp_path, monkeypatch):
    """Other versions' builds (and failed builds' leftovers) are removed once a month old;
    recent ones stay, and loading a build counts as using it."""
    monkeypatch.setenv("WIDEDEEP_CACHE", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    old, recent, leftover = (folder / n for n in ("fused-0ld.so", "fused-recent.so", "tmp1.so"))
    month = fused.STALE_DAYS * 86400
    for path, age in ((old, month + 60), (recent, month - 3600), (leftover, month + 60)):
        path.write_bytes(b"")
        os.utime(path, (time.time() - age, time.time() - age))
    terminal = _Terminal()
    monkeypatch.setattr(fused.sys, "stderr", terminal)
    built = fused._build()
    assert built.exists() and recent.exists()
    assert not old.exists() and not leftover.exists()
    assert "building the compiled training step" in terminal.getvalue()  # a pause: said why
    terminal.truncate(0)
    os.utime(built, (0, 0))
    assert fused._build() == built and built.stat().st_mtime > time.time() - 60
    assert terminal.getvalue() == ""  # cached: nothing to say


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
