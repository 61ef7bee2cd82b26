"""Metrics against scikit-learn on named cases."""

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from widedeep import metrics
from widedeep.errors import UserError

# name -> (probs (n, C), target (n,)); each case stresses one edge
CASES = {
    "binary": (
        [[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.45, 0.55], [0.7, 0.3]],
        [0, 1, 1, 1, 0, 0],
    ),
    "multi_class": (
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2], [0.3, 0.3, 0.4],
         [0.2, 0.6, 0.2], [0.5, 0.1, 0.4]],
        [0, 1, 2, 1, 0, 1, 2],
    ),
    "class_never_predicted": (
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.2, 0.3], [0.3, 0.4, 0.3]],
        [0, 1, 2, 2],
    ),
    "class_absent_from_target": (
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]],
        [0, 1, 1, 0],
    ),
    "perfect": (
        [[0.9, 0.1], [0.2, 0.8], [0.95, 0.05], [0.01, 0.99]],
        [0, 1, 0, 1],
    ),
}


def _case(name):
    probs, target = CASES[name]
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(target)


@pytest.mark.parametrize("name", CASES)
def test_log_loss_and_accuracy_match_sklearn(name):
    probs, target = _case(name)
    labels = list(range(probs.shape[1]))
    assert metrics.log_loss(probs, target) == pytest.approx(
        skm.log_loss(target.numpy(), probs.numpy(), labels=labels), abs=1e-9)
    assert metrics.accuracy(probs, target) == pytest.approx(
        skm.accuracy_score(target.numpy(), probs.argmax(1).numpy()))


@pytest.mark.parametrize("name", CASES)
def test_confusion_and_prf_match_sklearn(name):
    probs, target = _case(name)
    C, pred = probs.shape[1], probs.argmax(1)
    cm = metrics.confusion_matrix(pred, target, C)
    expected = skm.confusion_matrix(target.numpy(), pred.numpy(), labels=list(range(C)))
    assert cm.dtype == torch.int64
    np.testing.assert_array_equal(cm.numpy(), expected)
    got = metrics.precision_recall_f1(cm)
    p, r, f, s = skm.precision_recall_fscore_support(
        target.numpy(), pred.numpy(), labels=list(range(C)), zero_division=0)
    np.testing.assert_allclose(got["precision"], p)
    np.testing.assert_allclose(got["recall"], r)
    np.testing.assert_allclose(got["f1"], f)
    assert got["support"] == s.tolist()


def test_never_predicted_and_absent_classes_score_zero():
    never = metrics.confusion_matrix(torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 2]), 3)
    prf = metrics.precision_recall_f1(never)
    assert prf["precision"][2] == 0.0 and prf["recall"][2] == 0.0 and prf["f1"][2] == 0.0
    absent = metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3)
    assert metrics.precision_recall_f1(absent)["recall"][2] == 0.0
    assert metrics.normalize_rows(absent)[2].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("name", ["binary", "perfect"])
def test_roc_auc_matches_sklearn(name):
    probs, target = _case(name)
    assert metrics.roc_auc(probs[:, 1], target) == pytest.approx(
        skm.roc_auc_score(target.numpy(), probs[:, 1].numpy()))


def test_roc_auc_ties_are_averaged():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.2, 0.9, 0.2, 0.5])
    target = torch.tensor([0, 1, 1, 0, 1, 1, 0])
    expected = skm.roc_auc_score(target.numpy(), scores.numpy())
    assert metrics.roc_auc(scores, target) == pytest.approx(expected)
    assert metrics.roc_auc(torch.full((4,), 0.3), torch.tensor([0, 1, 0, 1])) == 0.5


def test_roc_auc_is_none_with_one_class():
    assert metrics.roc_auc(torch.tensor([0.1, 0.7]), torch.tensor([1, 1])) is None


def test_normalize_rows_matches_sklearn():
    probs, target = _case("multi_class")
    pred = probs.argmax(1)
    got = metrics.normalize_rows(metrics.confusion_matrix(pred, target, 3))
    expected = skm.confusion_matrix(target.numpy(), pred.numpy(), normalize="true")
    np.testing.assert_allclose(got.numpy(), expected)


def test_base_rate_loss_diabetes_prior():
    target = torch.cat([torch.zeros(263, dtype=torch.long), torch.ones(496, dtype=torch.long)])
    assert metrics.base_rate_loss(target, 2) == pytest.approx(0.6453, abs=1e-4)
    # the constant predictor of the prior reaches exactly this log-loss
    prior = torch.tensor([[263 / 759, 496 / 759]]).expand(759, 2)
    assert metrics.log_loss(prior, target) == pytest.approx(metrics.base_rate_loss(target, 2))


def test_base_rate_loss_absent_class_contributes_zero():
    target = torch.tensor([0, 0, 2, 2])
    assert metrics.base_rate_loss(target, 3) == pytest.approx(math.log(2))


def test_probabilities_binary_is_sigmoid():
    logits = torch.tensor([[-2.0], [0.0], [3.0]])
    p = metrics.probabilities(logits)
    assert p.shape == (3, 2)
    torch.testing.assert_close(p[:, 1], torch.sigmoid(logits[:, 0]))
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    torch.testing.assert_close(metrics.probabilities(logits[:, 0]), p)


def test_probabilities_multiclass_is_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    p = metrics.probabilities(logits)
    torch.testing.assert_close(p, torch.softmax(logits, dim=1))
    torch.testing.assert_close(p[1], torch.full((3,), 1 / 3))


def test_log_loss_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert metrics.log_loss(probs, torch.tensor([1, 1])) == pytest.approx(-math.log(1e-7) / 2)


def test_classification_report_binary_is_json_ready():
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0]], requires_grad=True)
    target = torch.tensor([1, 0, 0, 0])
    report = metrics.classification_report(logits, target, ["no", "yes"])
    json.dumps(report)  # raises if any value is a tensor or numpy scalar
    assert report["accuracy"] == 0.75 and report["auc"] == 1.0
    assert report["confusion_matrix"] == [[2, 1], [0, 1]]
    assert report["support"] == [3, 1]
    assert set(report) == {"loss", "accuracy", "auc", "confusion_matrix",
                           "confusion_matrix_normalized", "precision", "recall", "f1",
                           "support"}


def test_classification_report_multiclass_has_no_auc():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])
    report = metrics.classification_report(logits, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert report["auc"] is None and report["accuracy"] == 1.0
    assert report["loss"] == pytest.approx(
        skm.log_loss([0, 1, 2], torch.softmax(logits, 1).numpy()))


@pytest.mark.parametrize("call, words", [
    (lambda: metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), 2),
     "(2,) and (3,)"),
    (lambda: metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 2),
     "0..1, got range 0..5"),
    (lambda: metrics.confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 0]), 1),
     "num_classes must be >= 2, got 1"),
    (lambda: metrics.accuracy(torch.ones(3, 2), torch.tensor([0, 1])), "shape (3,)"),
    (lambda: metrics.log_loss(torch.ones(2, 2), torch.tensor([0.0, 1.0])), "dtype"),
    (lambda: metrics.base_rate_loss(torch.tensor([0, 3]), 2), "got range 0..3"),
    (lambda: metrics.classification_report(torch.ones(2, 3), torch.tensor([0, 1]), ["a", "b"]),
     "3 classes"),
])
def test_bad_input_names_the_value(call, words):
    with pytest.raises(UserError) as info:
        call()
    assert words in str(info.value)
    assert "\n" not in str(info.value)
