"""The batched engine against its reference, the plain loop: same initial weights and data
order -> same per-epoch losses, final weights, stopping decisions and probes (float32
tolerance); run_many's batched summaries equal its plain ones."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from widedeep import batched, batched_fit, batched_run, data
from widedeep.batched_fit import fit_batched
from widedeep.config import make_config
from widedeep.errors import UserError
from widedeep.model import build_model
from widedeep.probes import ProbeCallback
from widedeep.run import num_threads, run_many
from widedeep.train import Split, criterion_for, fit

LOSS_TOL = dict(rtol=1e-4, atol=1e-5)  # Adam's rounding differences grow over epochs
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small nets: intra-op threads only add overhead (and contend on a shared machine)."""
    with num_threads(1):
        yield


def _split(name: str, rows: int | None = None, offset: int = 0) -> tuple[Split, int]:
    ds = data.load_dataset(name)
    X, _ = data.standardize(ds.X, ds.X)
    idx = np.random.default_rng(offset).permutation(ds.n_rows)[:rows]
    return Split(torch.as_tensor(X[idx]), torch.as_tensor(ds.y[idx])), ds.n_classes


def _plain(models, trains, configs, n_classes, vals, rngs):
    """Each model trained on its own by widedeep.train.fit, with a ProbeCallback, from the
    random state ``rngs[k]``."""
    out = []
    for k, (model, train, c) in enumerate(zip(models, trains, configs, strict=True)):
        torch.set_rng_state(rngs[k])
        prober = ProbeCallback(train.X, train.y, criterion_for(n_classes), c.activation,
                               c.probe_epochs)
        result = fit(model, train, c, n_classes, val=vals[k] if vals else None,
                     callbacks=(prober,))
        out.append((result, prober))
    return out


def _compare(configs, trains, n_classes, vals=None, unstable=()):
    """Train copies of the same models both ways; assert they agree; return the results.
    ``unstable``: names of parameters and buffers not compared (ending so)."""
    models, rngs = [], []  # rngs: where the plain loop starts training each (run.py's order)
    for c in configs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, trains[0].X.shape[1], n_classes))
        rngs.append(torch.get_rng_state())
    plain_models = [copy.deepcopy(m) for m in models]
    expected = _plain(plain_models, trains, configs, n_classes, vals, rngs)
    results, probes = fit_batched(models, trains, configs, vals=vals, rngs=rngs)
    for (want, prober), got, rec, pm, bm in zip(expected, results, probes, plain_models, models,
                                                strict=True):
        assert len(got.train_loss) == len(want.train_loss)
        np.testing.assert_allclose(got.train_loss, want.train_loss, **LOSS_TOL)
        np.testing.assert_allclose(got.val_loss, want.val_loss, **LOSS_TOL)
        assert (got.best_epoch, got.diverged) == (want.best_epoch, want.diverged)
        for (name, p), (_, q) in zip([*bm.named_parameters(), *bm.named_buffers()],
                                     [*pm.named_parameters(), *pm.named_buffers()],
                                     strict=True):
            if not name.endswith(unstable):
                torch.testing.assert_close(p, q, equal_nan=True, msg=name, **WEIGHT_TOL)
        assert sorted(rec.records) == sorted(prober.records)
        for epoch, record in prober.records.items():
            for row, ref in zip(rec.records[epoch]["rows"], record["rows"], strict=True):
                assert row.keys() == ref.keys() and row["name"] == ref["name"]
                for key in ("grad_norm", "act_mean", "act_std", "saturated", "dead"):
                    # NOTE: a mean of activations of unit scale can sit near 0, where a
                    # relative tolerance means nothing: its absolute one is at unit scale.
                    atol = 1e-5 if key == "act_mean" else 1e-6
                    want = None if ref[key] is None else pytest.approx(ref[key], rel=1e-4,
                                                                     abs=atol, nan_ok=True)
                    assert row[key] == want, key
    return results


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full", "minibatch"])
@pytest.mark.parametrize("dataset", ["breast_cancer", "wine"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh", "selu", "softmax", "prelu",
                                        "rrelu"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_matches_plain_loop(optimizer, activation, dataset, batch_size):
    train, n_classes = _split(dataset, rows=120)
    lr = 0.1 if optimizer == "sgd" else 0.01
    configs = [make_config(optimizer=optimizer, activation=activation, lr=lr, epochs=12,
                           batch_size=batch_size, widths=(7, 5), seed=s, probe_epochs=(3,),
                           init="lecun" if activation == "selu" else "default")
               for s in range(3)]
    _compare(configs, [train] * 3, n_classes)


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full", "minibatch"])
@pytest.mark.parametrize("activation,residual", [("relu", False), ("tanh", True),
                                                 ("selu", False), ("rrelu", True)])
def test_dropout_matches_plain_loop(activation, residual, batch_size):
    """Each model's masks drawn from its own copy of the plain loop's stream (alpha dropout
    after selu), with residual blocks, early stopping and probes in both modes."""
    train, n_classes = _split("wine", rows=120)
    val, _ = _split("wine", rows=40, offset=1)
    configs = [make_config(optimizer="adam", activation=activation, lr=0.01, epochs=15,
                           batch_size=batch_size, dropout=0.3, residual=residual, widths=(7, 7),
                           seed=s, probe_epochs=(3,), patience=4) for s in range(3)]
    _compare(configs, [train] * 3, n_classes, vals=[val] * 3)


@pytest.mark.parametrize("alpha", [False, True], ids=["dropout", "alpha-dropout"])
def test_the_torch_ops_step_draws_dropout_masks_compiled_as_the_plain_loop(monkeypatch, alpha):
    """Where the compiled step is not used (rrelu, or layers wider than it takes), dropout's
    masks still come from its compiled draw of each model's stream, and match the plain
    loop's; torch's bernoulli_ draws them only where that cannot be had."""
    from widedeep import fused

    if fused.library() is None:
        pytest.skip(f"no compiled step here ({fused.status()})")
    drawn = []
    real = batched.dropout_masks
    monkeypatch.setattr(batched, "dropout_masks", lambda *a: drawn.append(a) or real(*a))
    train, n_classes = _split("wine", rows=120)
    configs = [make_config(optimizer="adam", lr=0.01, epochs=6, dropout=0.3, seed=s,
                           activation="selu" if alpha else "rrelu", batch_size=40,
                           widths=(7, fused.MAX_WIDTH + 3) if alpha else (7, 7),
                           init="lecun" if alpha else "default") for s in range(3)]
    _compare(configs, [train] * 3, n_classes)
    assert drawn == []  # not torch's draw: the compiled one


@pytest.mark.parametrize("dataset,cross,dropout,batch_size", [
    ("wine", False, 0.0, None), ("wine", True, 0.2, 40),
    ("breast_cancer", True, 0.0, None), ("breast_cancer", False, 0.3, 40)])
def test_wide_and_deep_matches_plain_loop(dataset, cross, dropout, batch_size):
    """The wide part's logits (on crossed features too) added to the deep part's; its
    weights trained with the rest; probes of the deep path only, as the plain loop's."""
    train, n_classes = _split(dataset, rows=120)
    val, _ = _split(dataset, rows=40, offset=1)
    configs = [make_config(arch="widedeep", cross=cross, optimizer="adam", activation="tanh",
                           lr=0.01, epochs=15, batch_size=batch_size, dropout=dropout,
                           widths=(7, 7), seed=s, probe_epochs=(3,), patience=4)
               for s in range(3)]
    _compare(configs, [train] * 3, n_classes, vals=[val] * 3)


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full", "minibatch"])
@pytest.mark.parametrize("momentum,activation,residual", [(0.0, "relu", False),
                                                          (0.9, "tanh", True),
                                                          (0.0, "selu", False)])
def test_batch_norm_matches_plain_loop(momentum, activation, residual, batch_size):
    """Batch statistics in training, running ones in validation and in the probes after it;
    running means, variances and step counts as the plain loop leaves them (the best
    epoch's under early stopping), per model; alpha dropout after selu."""
    train, n_classes = _split("wine", rows=120)
    val, _ = _split("wine", rows=40, offset=1)
    configs = [make_config(optimizer="sgd", momentum=momentum, activation=activation,
                           residual=residual, lr=0.05, epochs=15, norm="batch",
                           batch_size=batch_size, widths=(7, 7), seed=s, probe_epochs=(3,),
                           patience=4, dropout=0.2 if activation == "selu" else 0.0)
               for s in range(3)]
    _compare(configs, [train] * 3, n_classes, vals=[val] * 3)
    _compare(configs, [train] * 3, n_classes)  # no validation: probes in training mode


@pytest.mark.parametrize("options", [dict(arch="widedeep", cross=True, activation="tanh"),
                                     dict(activation="prelu"),
                                     dict(activation="rrelu", dropout=0.2),
                                     dict(activation="softmax", widths=(8, 5, 6))],
                         ids=["widedeep", "prelu", "rrelu-dropout", "softmax-ragged"])
def test_batch_norm_with_every_other_option_matches_plain_loop(options):
    train, n_classes = _split("wine", rows=120)
    val, _ = _split("wine", rows=40, offset=1)
    configs = [make_config(seed=s, **{**dict(optimizer="sgd", lr=0.05, epochs=10, norm="batch",
                                             widths=(7, 7), patience=3, probe_epochs=(2,)),
                                      **options}) for s in range(3)]
    _compare(configs, [train] * 3, n_classes, vals=[val] * 3)


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full", "minibatch"])
def test_batch_norm_under_adam_matches_but_for_the_biases_it_cancels(batch_size):
    """A bias before batch norm has a gradient of zero plus rounding noise, which Adam scales
    up to steps of about lr either way, differently on each engine (as on any two float32
    implementations); batch statistics cancel it in training, so all else agrees: losses,
    the other weights, running variances, probes in training mode."""
    train, n_classes = _split("wine", rows=120)
    configs = [make_config(optimizer="adam", activation="tanh", lr=0.01, epochs=12,
                           norm="batch", batch_size=batch_size, widths=(7, 7), seed=s,
                           probe_epochs=(3,)) for s in range(3)]
    _compare(configs, [train] * 3, n_classes, unstable=("linear.bias", "running_mean"))


def test_batch_norm_on_a_batch_of_one_row_is_refused_before_training():
    train, n_classes = _split("wine", rows=41)  # batches of 40, then 1
    config = make_config(norm="batch", batch_size=40, epochs=2, widths=(5,))
    torch.manual_seed(0)
    model = build_model(config, train.X.shape[1], n_classes)
    before = copy.deepcopy(model.state_dict())
    words = "41 training rows in batches of 40 leave a last batch of 1 row"
    with pytest.raises(UserError, match=words) as plain:
        fit(model, train, config, n_classes)
    with pytest.raises(UserError, match=words) as fast:
        fit_batched([model, copy.deepcopy(model)], [train] * 2, [config] * 2)
    assert str(fast.value) == str(plain.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    # below that check, the stacked layer fails on one row as nn.BatchNorm1d does
    trainer = batched_fit.Trainer([model, copy.deepcopy(model)], [config] * 2)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        trainer.epoch(batched_fit.stack_data([train] * 2))


def test_per_model_hyperparameters_data_and_layer_norm():
    """lr, momentum, weight decay and init per model; each model its own rows."""
    trains = [_split("wine", rows=100, offset=k)[0] for k in range(4)]
    configs = [make_config(lr=lr, momentum=m, weight_decay=wd, init=init, norm="layer",
                           residual=True, widths=(6, 6), activation="tanh", epochs=15,
                           batch_size=32, seed=k)
               for k, (lr, m, wd, init) in enumerate([(0.1, 0.0, 0.0, "default"),
                                                      (0.05, 0.9, 0.01, "xavier"),
                                                      (0.2, 0.5, 0.0, "kaiming"),
                                                      (0.01, 0.0, 0.1, "default")])]
    _compare(configs, trains, 3)


def test_adamw_per_model_weight_decay():
    train, n_classes = _split("breast_cancer", rows=150)
    configs = [make_config(optimizer="adamw", lr=0.01, weight_decay=wd, activation="gelu",
                           epochs=15, seed=s) for s, wd in enumerate([0.0, 0.01, 0.3])]
    _compare(configs, [train] * 3, n_classes)


@pytest.mark.parametrize("retire", [True, False], ids=["retired", "riding-along"])
@pytest.mark.parametrize("activation", ["relu", "rrelu"])
def test_early_stopping_and_divergence_per_model(activation, retire, monkeypatch):
    """Each model stops (patience, or a non-finite loss) where the plain loop would, whether
    stopped models leave the stack (the CPU) or stay in it to the end (CUDA); rrelu: probes
    after a validation pass evaluate (mean slope) where the plain loop's do."""
    monkeypatch.setattr(batched_fit, "RETIRE", retire)
    stacks = []  # models in the stack at each step
    step = batched_fit.Trainer.step
    monkeypatch.setattr(batched_fit.Trainer, "step",
                        lambda self, data: stacks.append(len(self.flat)) or step(self, data))
    train, n_classes = _split("wine", rows=120)
    val, _ = _split("wine", rows=40, offset=1)
    configs = [make_config(optimizer="sgd", lr=lr, activation=activation, widths=(16, 16),
                           epochs=60, patience=3, seed=s, probe_epochs=(2, 30))
               for s, lr in enumerate([0.5, 1e6, 0.05])]
    results = _compare(configs, [train] * 3, n_classes, vals=[val] * 3)
    assert results[1].diverged and results[1].epochs_run < 60
    assert not results[0].diverged and results[0].epochs_run < 60  # stopped by patience
    runs = sorted(r.epochs_run for r in results)
    if retire:  # 3 models until the first stops, then 2, then 1
        assert stacks == [3] * runs[0] + [2] * (runs[1] - runs[0]) + [1] * (runs[2] - runs[1])
    else:
        assert stacks == [3] * runs[2]


@pytest.fixture(scope="module", params=[dict(activation="tanh"), dict(activation="rrelu"),
                                        dict(activation="relu", arch="widedeep", cross=True,
                                             dropout=0.2),
                                        dict(activation="relu", norm="batch", optimizer="sgd",
                                             lr=0.05, batch_size=32)],
                ids=["tanh", "rrelu", "widedeep-dropout", "batch-norm"])
def summaries(request):
    """run_many on both engines: wine, 3 seeds, 3-fold cv (folds of 60/59/59 rows); random
    slopes and masks come from the random state each fold's model was built in; batch norm's
    predictions from the running statistics each fold's model was left with."""
    options = dict(dataset="wine", split="cv:3", optimizer="adam", lr=0.01, epochs=20,
                   patience=4, probe_epochs=(5,)) | request.param
    return {engine: run_many([make_config(seed=s, engine=engine, **options)
                              for s in range(3)]) for engine in ("plain", "batched")}


def test_run_many_batched_equals_plain(summaries):
    for plain, fast in zip(summaries["plain"], summaries["batched"], strict=True):
        a, b = plain.summary, fast.summary
        assert (a["engine"], a["engine_reason"]) == ("plain", "engine plain requested")
        assert (b["engine"], b["engine_reason"]) == ("batched", None)
        assert a.keys() == b.keys()
        assert a["confusion_matrix"] == b["confusion_matrix"]
        for key in a.keys() - {"seconds", "engine", "engine_reason"}:
            _assert_close(b[key], a[key], key)
        _assert_close(fast.history, plain.history, "history")
        _assert_close(fast.probes, plain.probes, "probes")


def _assert_close(got, want, where: str) -> None:
    """Floats within float32 tolerance, everything else (ints, names, None) exactly."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    else:
        assert got == want, where


def test_plan_says_why_a_config_runs_on_the_plain_loop():
    base = dict(dataset="iris", epochs=2)
    configs = [make_config(seed=0, **base), make_config(seed=1, **base),
               make_config(seed=2, engine="plain", **base),
               make_config(seed=3, dropout=0.2, **base),
               make_config(seed=4, activation="tanh", **base),
               make_config(seed=5, activation="relu6", split="cv:3", **base)]
    reasons = batched_run.plan(configs)
    assert reasons[:2] == [None, None]
    assert reasons[2] == "engine plain requested"
    assert "no other model" in reasons[3]  # dropout itself is batched (test below)
    assert "no other model" in reasons[4]
    assert reasons[5] is None  # alone, but its three folds train together


def test_random_slopes_masks_and_wide_and_deep_are_batched():
    configs = [make_config(dataset="iris", activation=a, dropout=p, seed=s, device="cpu")
               for a, p in (("prelu", 0.0), ("rrelu", 0.0), ("relu", 0.2)) for s in range(2)]
    configs += [make_config(dataset="iris", arch="widedeep", seed=s) for s in range(2)]
    assert batched_run.plan(configs) == [None] * 8
    reason = batched.unsupported_reason(make_config(activation="rrelu", device="cuda"))
    assert "rrelu on CUDA" in reason
    reason = batched.unsupported_reason(make_config(dropout=0.1, device="cuda"))
    assert "dropout 0.1 on CUDA" in reason


def test_forcing_batched_on_an_unsupported_config_names_why():
    with pytest.raises(UserError, match="engine batched cannot train this config: activation "
                                        "rrelu on CUDA"):
        run_many([make_config(dataset="iris", activation="rrelu", device="cuda",
                              engine="batched")])


def test_forced_batched_runs_a_single_config():
    (result,) = run_many([make_config(dataset="iris", epochs=5, engine="batched")])
    assert result.summary["engine"] == "batched"
    assert len(result.history) == 5


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: CUDA-graph replay is checked on a GPU machine only")
def test_cuda_graph_replay_matches_eager_steps():
    train, n_classes = _split("breast_cancer", rows=200)
    train = Split(train.X.cuda(), train.y.cuda())
    runs = {}
    for graphs in (False, True):
        configs = [make_config(optimizer="adam", lr=0.01, epochs=20, seed=s, device="cuda")
                   for s in range(4)]
        models = []
        for c in configs:
            torch.manual_seed(c.seed)
            models.append(build_model(c, train.X.shape[1], n_classes).cuda())
        results, _ = fit_batched(models, [train] * 4, configs, cuda_graphs=graphs)
        runs[graphs] = (results, models)
    for eager, graphed in zip(*(runs[g][0] for g in (False, True)), strict=True):
        np.testing.assert_allclose(graphed.train_loss, eager.train_loss, **LOSS_TOL)
