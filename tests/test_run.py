import json

import pytest
import torch

from widedeep.config import make_config
from widedeep.data import load_dataset
from widedeep.metrics import confusion_matrix
from widedeep.model import build_model, linear_layers
from widedeep.probes import ProbeCallback, gradient_norms
from widedeep.records import is_complete, read_run_folder, write_run_folder
from widedeep.run import epochs_to_leave_plateau, run_experiment
from widedeep.train import criterion_for

REQUIRED = (
    "dataset split n_train n_test arch activation widths init optimizer lr epochs seed device "
    "torch_version final_train_loss base_rate_loss test_loss test_accuracy test_auc "
    "confusion_matrix class_names grad_norms_init grad_ratio_init epochs_to_leave_plateau "
    "diverged seconds"
).split()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lecture_preset_stalls_at_the_base_rate_loss(diabetes_dir, seed):
    s = run_experiment(make_config(preset="lecture", seed=seed)).summary
    assert s["base_rate_loss"] == pytest.approx(0.6453, abs=1e-4)
    assert abs(s["final_train_loss"] - s["base_rate_loss"]) < 0.01
    assert s["epochs_to_leave_plateau"] is None
    assert s["class_names"] == ["diabetic", "not diabetic"]
    assert s["evaluated_on"].startswith("training rows")
    assert set(REQUIRED) <= set(s)


def test_relu_adam_leaves_the_plateau(diabetes_dir):
    s = run_experiment(make_config(preset="lecture", activation="relu", optimizer="adam",
                                   lr=0.01, widths=(64, 64))).summary
    assert s["epochs_to_leave_plateau"] is not None
    assert s["final_train_loss"] < s["base_rate_loss"] - 0.1


def test_epochs_to_leave_plateau_is_the_first_epoch_below_the_margin():
    assert epochs_to_leave_plateau([0.70, 0.645, 0.634, 0.5], 0.645) == 3
    assert epochs_to_leave_plateau([0.70, 0.64], 0.645) is None


def test_gradient_norm_probe_equals_a_direct_computation():
    torch.manual_seed(0)
    model = build_model(make_config(depth=5, width=7, activation="tanh"), 4, 3)
    X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(X), y).backward()
    expected = [layer.weight.grad.norm().item() for _, layer in linear_layers(model)]
    got = gradient_norms(model, X, y, criterion_for(3))
    assert got == pytest.approx(expected, rel=1e-5)


def test_probes_run_only_at_the_epochs_they_record(monkeypatch):
    import widedeep.probes

    calls = []
    real = widedeep.probes.probe
    monkeypatch.setattr(widedeep.probes, "probe", lambda *a, **k: calls.append(k["epoch"])
                        or real(*a, **k))
    ds = load_dataset("iris")
    res = run_experiment(make_config(dataset="iris", epochs=12, probe_epochs=(5,)), dataset=ds)
    assert calls == [0, 5, -1]
    assert {r["epoch"] for r in res.probes} == {0, 5, -1}
    assert len(res.history) == 12


def test_probe_does_not_change_the_training_trajectory():
    ds = load_dataset("wine")
    opts = dict(dataset="wine", epochs=8, norm="batch", dropout=0.2, activation="relu",
                optimizer="adam", lr=0.01, batch_size=32)
    a = run_experiment(make_config(**opts), dataset=ds).summary
    b = run_experiment(make_config(**opts, probe_epochs=(1, 2, 3, 4)), dataset=ds).summary
    assert a["final_train_loss"] == b["final_train_loss"]
    assert a["test_loss"] == b["test_loss"]


def test_same_seed_same_json_but_seconds():
    ds = load_dataset("breast_cancer")
    cfg = make_config(dataset="breast_cancer", epochs=15, batch_size=64, optimizer="adam",
                      lr=0.01, activation="relu", seed=3)
    a, b = (run_experiment(cfg, dataset=ds).summary for _ in range(2))
    a.pop("seconds"), b.pop("seconds")
    assert json.dumps(a) == json.dumps(b)
    other = run_experiment(make_config(**{**cfg.to_dict(), "seed": 4}), dataset=ds).summary
    assert other["final_train_loss"] != a["final_train_loss"]


def test_divergence_is_recorded_not_raised():
    s = run_experiment(make_config(dataset="iris", activation="relu", lr=1e6, epochs=50,
                                   widths=(64, 64))).summary
    assert s["diverged"] and "epoch" in s["diverged_reason"]
    assert s["test_loss"] is None and s["final_train_loss"] is None
    json.dumps(s, allow_nan=False)


def test_early_stopping_restores_the_best_epoch():
    s = run_experiment(make_config(dataset="breast_cancer", patience=3, epochs=400,
                                   optimizer="adam", lr=0.05, activation="relu",
                                   widths=(64, 64))).summary
    assert s["epochs_run"] < 400
    assert s["epochs_run"] - s["best_epoch"] == 3


def test_cross_validation_reports_mean_and_spread_and_covers_every_row():
    ds = load_dataset("iris")
    s = run_experiment(make_config(dataset="iris", split="cv:3", epochs=30, optimizer="adam",
                                   lr=0.05, activation="relu"), dataset=ds).summary
    assert len(s["folds"]) == 3 and s["test_loss_std"] is not None
    assert sum(map(sum, s["confusion_matrix"])) == ds.n_rows
    mean = sum(f["test_loss"] for f in s["folds"]) / 3
    assert s["test_loss"] == pytest.approx(mean)


def test_summary_confusion_matrix_matches_its_test_rows():
    ds = load_dataset("wine")
    s = run_experiment(make_config(dataset="wine", epochs=30, optimizer="adam", lr=0.02),
                       dataset=ds).summary
    assert sum(map(sum, s["confusion_matrix"])) == s["n_test"]
    assert s["test_auc"] is None  # three classes
    diag = sum(s["confusion_matrix"][i][i] for i in range(3))
    assert diag / s["n_test"] == pytest.approx(s["test_accuracy"])
    assert confusion_matrix(torch.tensor([0]), torch.tensor([0]), 3).shape == (3, 3)


def test_probe_callback_records_saturation_for_each_hidden_layer():
    torch.manual_seed(0)
    model = build_model(make_config(depth=3, width=5, activation="relu"), 4, 2)
    X, y = torch.randn(20, 4), torch.randint(0, 2, (20,))
    cb = ProbeCallback(X, y, criterion_for(2), "relu")
    cb.on_train_begin(model)
    rows = cb.rows
    assert [r["name"] for r in rows] == ["blocks.0", "blocks.1", "blocks.2", "head"]
    assert all(0 <= r["saturated"] <= 1 for r in rows[:3]) and rows[3]["saturated"] is None
    pre = model.blocks[0].linear(X)
    assert rows[0]["saturated"] == pytest.approx((pre <= 0).float().mean().item())


def test_run_folder_is_complete_only_when_fully_written(tmp_path, monkeypatch):
    res = run_experiment(make_config(dataset="iris", epochs=3))
    out = write_run_folder(tmp_path / "run", config={"a": 1}, summary=res.summary,
                           history=res.history, probes=res.probes, environment={})
    assert is_complete(out) and read_run_folder(out)["report"] == res.summary

    import widedeep.records

    real = widedeep.records.write_json

    def crash(path, obj):
        if path.name == "probes.json":
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(widedeep.records, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        write_run_folder(tmp_path / "run2", config={}, summary=res.summary,
                         history=res.history, probes=res.probes, environment={})
    assert not (tmp_path / "run2").exists()
    assert not list(tmp_path.glob(".run2*"))


def test_wide_and_deep_trains_end_to_end():
    s = run_experiment(make_config(dataset="breast_cancer", arch="widedeep", cross=True,
                                   optimizer="adam", lr=0.01, epochs=30)).summary
    assert s["arch"] == "widedeep" and s["test_accuracy"] > 0.9


def test_divergence_with_early_stopping_keeps_history_aligned():
    res = run_experiment(make_config(dataset="iris", activation="relu", lr=1e6, epochs=50,
                                     widths=(64, 64), patience=5))
    assert res.summary["diverged"]
    assert len(res.history) == res.summary["epochs_run"]
    assert res.history[-1]["val_loss"] is None
