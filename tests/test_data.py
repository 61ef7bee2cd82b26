"""Datasets, the verified diabetes file, user CSVs, folds and scaling. Nothing downloads."""

import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from widedeep import data
from widedeep.errors import UserError


@pytest.fixture
def diabetes_file() -> Path:
    """The real diabetes file from $WIDEDEEP_DATA (CI sets it to ../shared/data)."""
    folder = os.environ.get("WIDEDEEP_DATA")
    if not folder:
        pytest.skip("WIDEDEEP_DATA is not set: no local copy of diabetes.csv.gz to test with")
    path = Path(folder) / data.DIABETES_FILE
    if not path.is_file():
        pytest.skip(f"WIDEDEEP_DATA={folder!r} has no {data.DIABETES_FILE}")
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty cache in tmp_path, WIDEDEEP_DATA unset, and a network that always fails."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("WIDEDEEP_CACHE", str(cache))
    monkeypatch.delenv("WIDEDEEP_DATA", raising=False)

    def no_network(url, dest):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(data, "_download", no_network)
    return cache


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------- registry and sklearn sets


def test_list_datasets_is_sorted_and_complete():
    assert data.list_datasets() == ["breast_cancer", "diabetes", "digits", "iris", "wine"]


@pytest.mark.parametrize("name, rows, features, classes", [
    ("breast_cancer", 569, 30, ("malignant", "benign")),
    ("wine", 178, 13, ("class_0", "class_1", "class_2")),
    ("iris", 150, 4, ("setosa", "versicolor", "virginica")),
    ("digits", 1797, 64, tuple(str(d) for d in range(10))),
])
def test_sklearn_datasets(name, rows, features, classes):
    ds = data.load_dataset(name)
    assert (ds.name, ds.n_rows, ds.n_features, ds.class_names) == (name, rows, features, classes)
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.X.shape == (rows, features) and ds.y.shape == (rows,)
    assert set(ds.y.tolist()) == set(range(len(classes)))
    assert len(ds.feature_names) == features and all(isinstance(f, str) for f in ds.feature_names)


def test_digits_feature_names():
    assert data.load_dataset("digits").feature_names[:2] == ("pixel_0", "pixel_1")


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError, match=r"'mnist'.*breast_cancer, diabetes, digits, iris, wine"):
        data.load_dataset("mnist")


@pytest.mark.parametrize("kwargs, words", [
    ({}, "exactly one"),
    ({"name": "iris", "csv": "x.csv", "target": "y"}, "exactly one"),
    ({"csv": "x.csv"}, "target column"),
])
def test_load_dataset_argument_errors(kwargs, words):
    with pytest.raises(UserError, match=words):
        data.load_dataset(**kwargs)


# ---------------------------------------------------------------- diabetes


def test_diabetes_from_widedeep_data(diabetes_file, monkeypatch):
    monkeypatch.setenv("WIDEDEEP_DATA", str(diabetes_file.parent))
    monkeypatch.setattr(data, "_download", _never_called)
    ds = data.load_dataset("diabetes")
    assert (ds.n_rows, ds.n_features, ds.n_classes) == (759, 8, 2)
    assert int((ds.y == 1).sum()) == 496
    assert ds.class_names == ("diabetic", "not diabetic")
    assert ds.feature_names[0] == "pregnancies" and ds.feature_names[-1] == "age"
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64
    assert ds.X.min() >= -1 and ds.X.max() <= 1


def _never_called(url, dest):
    raise AssertionError("the test tried to download")


def test_tampered_file_in_widedeep_data_is_refused(diabetes_file, tmp_path, monkeypatch):
    tampered = tmp_path / data.DIABETES_FILE
    tampered.write_bytes(diabetes_file.read_bytes() + b"\0")
    monkeypatch.setenv("WIDEDEEP_DATA", str(tmp_path))
    with pytest.raises(UserError, match=rf"checksum mismatch.*{data.DIABETES_SHA256}"):
        data.diabetes_path()


def test_widedeep_data_without_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("WIDEDEEP_DATA", str(tmp_path))
    with pytest.raises(UserError, match="WIDEDEEP_DATA.*does not exist"):
        data.diabetes_path()


def test_tampered_cache_file_is_refused(offline):
    offline.mkdir()
    (offline / data.DIABETES_FILE).write_bytes(b"not the diabetes file")
    with pytest.raises(UserError, match="checksum mismatch"):
        data.diabetes_path()


def test_download_with_wrong_bytes_caches_nothing(offline, monkeypatch):
    monkeypatch.setattr(data, "_download", lambda url, dest: dest.write_bytes(b"evil"))
    with pytest.raises(UserError, match="checksum mismatch"):
        data.diabetes_path()
    assert list(offline.iterdir()) == []


def test_offline_without_a_file_says_how_to_fix(offline):
    with pytest.raises(UserError) as info:
        data.load_dataset("diabetes")
    message = str(info.value)
    assert data.DIABETES_URL in message and "WIDEDEEP_DATA" in message
    assert str(offline / data.DIABETES_FILE) in message and "\n" not in message
    assert list(offline.iterdir()) == []


def test_download_success_is_cached_and_reused(diabetes_file, offline, monkeypatch):
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        shutil.copyfile(diabetes_file, dest)

    monkeypatch.setattr(data, "_download", fake_download)
    path = data.diabetes_path()
    assert path == offline / data.DIABETES_FILE and calls == [data.DIABETES_URL]
    assert [p.name for p in offline.iterdir()] == [data.DIABETES_FILE]  # no temp file left
    data.verify_sha256(path, data.DIABETES_SHA256)
    assert data.load_dataset("diabetes").n_rows == 759 and len(calls) == 1  # read from cache


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("WIDEDEEP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.cache_dir() == tmp_path / "widedeep"
    monkeypatch.setenv("WIDEDEEP_CACHE", str(tmp_path / "mine"))
    assert data.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("WIDEDEEP_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.cache_dir() == Path.home() / ".cache" / "widedeep"


# ---------------------------------------------------------------- user CSVs

GOOD_CSV = "a,b,label\n1,2,cat\n3,4.5,dog\n5,6,cat\n7,8,bird\n"


def test_csv_with_string_target(tmp_path):
    ds = data.load_dataset(csv=_write(tmp_path / "pets.csv", GOOD_CSV), target="label")
    assert ds.name == "pets" and ds.class_names == ("bird", "cat", "dog")
    assert ds.y.tolist() == [1, 2, 1, 0] and ds.feature_names == ("a", "b")
    np.testing.assert_array_equal(ds.X, np.array([[1, 2], [3, 4.5], [5, 6], [7, 8]], np.float32))
    assert ds.X.dtype == np.float32 and ds.y.dtype == np.int64


def test_csv_numeric_target_sorts_numerically(tmp_path):
    ds = data.load_dataset(csv=_write(tmp_path / "n.csv", "y,x\n10,1\n2,2\n10,3\n-1,4\n"),
                           target="y")
    assert ds.class_names == ("-1", "2", "10") and ds.y.tolist() == [2, 1, 2, 0]


def test_csv_gz(tmp_path):
    path = tmp_path / "pets.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write(GOOD_CSV)
    ds = data.load_dataset(csv=path, target="label")
    assert ds.name == "pets" and ds.n_rows == 4 and ds.n_classes == 3


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("a,b,label\n", "empty"),
    ("a,b,label\n1,2,x\n3,4\n", "row 3 has 2 fields, header has 3"),
    ("a,b,label\n1,2,x\n3,oops,y\n", "row 3, column 'b': non-numeric value 'oops'"),
    ("a,b,label\n1,nan,x\n3,4,y\n", "row 2, column 'b': NaN or infinite"),
    ("a,b,label\n1,2,x\n3,inf,y\n", "row 3, column 'b': NaN or infinite"),
    ("a,b,cls\n1,2,x\n3,4,y\n", "target column 'label' not in .*columns: a, b, cls"),
    ("a,b,label\n1,2,x\n3,4,x\n", "at least two classes, found 1"),
    ("label\nx\ny\n", "no feature columns"),
])
def test_bad_csv(tmp_path, text, words):
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(UserError, match=words) as info:
        data.load_dataset(csv=path, target="label")
    assert "bad.csv" in str(info.value) and "\n" not in str(info.value)


def test_missing_csv(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_dataset(csv=tmp_path / "nope.csv", target="label")


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.csv.gz"
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(UserError, match="cannot read CSV file .*bad.csv.gz"):
        data.load_dataset(csv=path, target="label")


# ---------------------------------------------------------------- folds and scaling


@pytest.mark.parametrize("split, expected", [
    ("none", ("none", 1)), ("holdout", ("holdout", 1)), ("cv:5", ("cv", 5)), ("cv:2", ("cv", 2)),
])
def test_parse_split(split, expected):
    assert data.parse_split(split) == expected


@pytest.mark.parametrize("split", ["cv:1", "cv:0", "cv:x", "cv", "kfold", "cv:-3"])
def test_parse_split_rejects(split):
    with pytest.raises(UserError, match=repr(split)):
        data.parse_split(split)


Y = np.array([0] * 60 + [1] * 30 + [2] * 10)


def test_split_none_is_all_rows_twice():
    (fold,) = data.make_folds(Y, "none")
    np.testing.assert_array_equal(fold.train, np.arange(100))
    np.testing.assert_array_equal(fold.test, np.arange(100))


def test_holdout_is_stratified_disjoint_and_seeded():
    (fold,) = data.make_folds(Y, "holdout", test_size=0.2, seed=1)
    assert fold.train.dtype == np.int64 and len(fold.test) == 20
    assert set(fold.train).isdisjoint(fold.test) and len(fold.train) + len(fold.test) == 100
    assert np.bincount(Y[fold.test]).tolist() == [12, 6, 2]
    (again,) = data.make_folds(Y, "holdout", test_size=0.2, seed=1)
    (other,) = data.make_folds(Y, "holdout", test_size=0.2, seed=2)
    np.testing.assert_array_equal(fold.test, again.test)
    assert not np.array_equal(fold.test, other.test)


def test_cv_covers_every_row_once_stratified():
    folds = data.make_folds(Y, "cv:5", seed=0)
    assert len(folds) == 5
    tests = np.concatenate([f.test for f in folds])
    np.testing.assert_array_equal(np.sort(tests), np.arange(100))
    for f in folds:
        assert set(f.train).isdisjoint(f.test) and len(f.train) + len(f.test) == 100
        assert np.bincount(Y[f.test]).tolist() == [12, 6, 2]
        assert f.train.dtype == np.int64 and f.test.dtype == np.int64
    same = data.make_folds(Y, "cv:5", seed=0)
    other = data.make_folds(Y, "cv:5", seed=3)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(folds, same, strict=True))
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(folds, other, strict=True))


def _label_sets() -> list[np.ndarray]:
    """Balanced, skewed, many-class, string-free label vectors, classes in mixed order."""
    rng = np.random.default_rng(7)
    out = [Y, rng.permutation(Y), np.array([1] * 5 + [0] * 40)]
    for n, n_classes in [(11, 2), (37, 3), (120, 2), (301, 5), (759, 2)]:
        counts = rng.multinomial(n - 3 * n_classes, rng.dirichlet(np.ones(n_classes))) + 3
        out.append(rng.permutation(np.repeat(rng.permutation(n_classes) * 3 + 1, counts)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 5, 42])
def test_folds_equal_scikit_learns(seed):
    """The same rows as train_test_split(stratify=y) and StratifiedKFold(shuffle=True) with
    the same seed: results of earlier runs and the baselines' folds stay as they were."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    for y in _label_sets():
        everything = np.arange(len(y))
        for test_size in (0.2, 0.25, 1 / 3, 0.5):
            if np.ceil(test_size * len(y)) < len(np.unique(y)):
                continue  # fewer test rows than classes: both refuse
            train, test = train_test_split(everything, test_size=test_size, stratify=y,
                                           random_state=seed)
            (fold,) = data.make_folds(y, "holdout", test_size=test_size, seed=seed)
            np.testing.assert_array_equal(fold.train, np.sort(train))
            np.testing.assert_array_equal(fold.test, np.sort(test))
        for k in [k for k in (2, 3, 5) if np.unique(y, return_counts=True)[1].min() >= k]:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            folds = data.make_folds(y, f"cv:{k}", seed=seed)
            for fold, (train, test) in zip(folds, splitter.split(everything, y), strict=True):
                np.testing.assert_array_equal(fold.train, train)
                np.testing.assert_array_equal(fold.test, test)


def test_a_run_on_the_lecture_file_imports_no_scikit_learn():
    """Folds are made here: a holdout run on diabetes starts a second faster."""
    folder = os.environ.get("WIDEDEEP_DATA")
    if not folder or not (Path(folder) / "diabetes.csv.gz").exists():
        pytest.skip("the lecture file is not available: set WIDEDEEP_DATA to its folder")
    code = ("import sys; from widedeep.cli import main; "
            "main(['train', '--epochs', '1', '--split', 'holdout', '--json']); "
            "print('sklearn' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("y, split, kwargs, words", [
    ([0, 0, 0, 1], "holdout", {}, r"at least 2 rows of every class.*\{0: 3, 1: 1\}"),
    ([0, 0, 1, 1, 1], "cv:3", {}, r"at least 3 rows of every class.*\{0: 2, 1: 3\}"),
    ([0] * 10 + [1] * 10, "holdout", {"test_size": 1.5}, "test_size must be in"),
    ([0] * 10 + [1] * 10, "holdout", {"test_size": 0.0}, "test_size must be in"),
    ([0, 0, 1, 1, 2, 2], "holdout", {"test_size": 0.2}, "2 test rows, fewer than the 3"),
])
def test_make_folds_refuses_impossible_splits(y, split, kwargs, words):
    with pytest.raises(UserError, match=words):
        data.make_folds(np.array(y), split, **kwargs)


def test_standardize_uses_train_stats_only():
    rng = np.random.default_rng(0)
    X_train = rng.normal(5, 3, size=(50, 3)).astype(np.float32)
    X_train[:, 2] = 7.0  # a constant column
    X_test = rng.normal(100, 1, size=(10, 3)).astype(np.float32)
    tr, te = data.standardize(X_train, X_test)
    assert tr.dtype == np.float32 and te.dtype == np.float32
    np.testing.assert_allclose(tr[:, :2].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(tr[:, :2].std(0), 1, atol=1e-5)
    mean, std = X_train.mean(0), X_train.std(0)
    np.testing.assert_allclose(te[:, :2], (X_test[:, :2] - mean[:2]) / std[:2], rtol=1e-5)
    np.testing.assert_allclose(tr[:, 2], 0.0)
    np.testing.assert_allclose(te[:, 2], X_test[:, 2] - 7.0, rtol=1e-5)
