"""Datasets, splits and scaling: everything between a file on disk and a float32 matrix.

Three sources: the lecture's diabetes file (verified by SHA-256, never trusted unchecked),
four datasets shipped with scikit-learn, and a user's CSV. All become a :class:`Dataset`
with ``X`` of shape (n, d) float32 and ``y`` of shape (n,) int64 in 0..C-1.
"""

from __future__ import annotations

import csv as csvlib
import gzip
import hashlib
import math
import os
import tempfile
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from widedeep.errors import UserError

DIABETES_URL = (
    "https://raw.githubusercontent.com/hunkim/PyTorchZeroToAll/master/data/diabetes.csv.gz"
)
DIABETES_SHA256 = "398214d0f6b7f4a722f598d8e424f28bc078abbd16ebdeea0f8e264492325aa4"
DIABETES_FILE = "diabetes.csv.gz"
DIABETES_FEATURES = ("pregnancies", "glucose", "blood_pressure", "skin_thickness", "insulin",
                     "bmi", "pedigree", "age")
# NOTE: the lecture's file flips the UCI labels: 0 = tested positive, 1 = tested negative.
DIABETES_CLASSES = ("diabetic", "not diabetic")
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class Dataset:
    """A classification table: ``X`` (n, d) float32, ``y`` (n,) int64 in 0..C-1."""

    name: str
    X: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])


# ---------------------------------------------------------------- the diabetes file


def cache_dir() -> Path:
    """``$WIDEDEEP_CACHE``, else ``$XDG_CACHE_HOME/widedeep``, else ``~/.cache/widedeep``."""
    if os.environ.get("WIDEDEEP_CACHE"):
        return Path(os.environ["WIDEDEEP_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "widedeep"
    return Path.home() / ".cache" / "widedeep"


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    """Raise UserError unless the SHA-256 of ``path`` is ``expected``."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    if digest != expected:
        raise UserError(f"checksum mismatch for {str(path)!r}: SHA-256 is {digest}, "
                        f"expected {expected}; the file is corrupt or not the expected one")


def _download(url: str, dest: Path) -> None:
    """Write the body at ``url`` to ``dest``; tests replace this function."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        dest.write_bytes(response.read())


def diabetes_path() -> Path:
    """Find (or download into the cache) the verified diabetes file."""
    folder = os.environ.get("WIDEDEEP_DATA")
    if folder:
        path = Path(folder) / DIABETES_FILE
        if not path.is_file():
            raise UserError(f"WIDEDEEP_DATA={folder!r} but {str(path)!r} does not exist")
        verify_sha256(path, DIABETES_SHA256)
        return path
    cached = cache_dir() / DIABETES_FILE
    if not cached.is_file():
        _fetch_into_cache(cached)
    verify_sha256(cached, DIABETES_SHA256)
    return cached


def _fetch_into_cache(cached: Path) -> None:
    """Download to a temp file beside ``cached``, verify, then rename it into place."""
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".diabetes-", suffix=".part", dir=cached.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            _download(DIABETES_URL, tmp)
        except OSError as exc:  # URLError, timeouts and refused connections are OSErrors
            raise UserError(
                f"cannot download the diabetes file from {DIABETES_URL} ({exc}); put "
                f"{DIABETES_FILE} in a folder and set WIDEDEEP_DATA=<folder>, "
                f"or place it at {cached}") from exc
        verify_sha256(tmp, DIABETES_SHA256)
        os.replace(tmp, cached)  # atomic: readers see no file or the whole verified file
    finally:
        tmp.unlink(missing_ok=True)


def _load_diabetes() -> Dataset:
    path = diabetes_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)  # (759, 9)
    assert table.ndim == 2 and table.shape[1] == 9, table.shape
    return Dataset(name="diabetes", X=table[:, :8].astype(np.float32),
                   y=table[:, 8].astype(np.int64), class_names=DIABETES_CLASSES,
                   feature_names=DIABETES_FEATURES)


# ---------------------------------------------------------------- scikit-learn's datasets


def _from_sklearn(name: str, loader: Callable) -> Dataset:
    bunch = loader()
    features = [str(f) for f in bunch.feature_names]
    if name == "digits":  # sklearn names them pixel_0_0 .. pixel_7_7
        features = [f"pixel_{i}" for i in range(bunch.data.shape[1])]
    return Dataset(name=name, X=np.asarray(bunch.data, dtype=np.float32),
                   y=np.asarray(bunch.target, dtype=np.int64),
                   class_names=tuple(str(c) for c in bunch.target_names),
                   feature_names=tuple(features))


def _sklearn_loader(name: str) -> Callable[[], Dataset]:
    def load() -> Dataset:
        from sklearn import datasets  # deferred: importing sklearn.datasets is slow

        return _from_sklearn(name, getattr(datasets, f"load_{name}"))

    return load


_DATASETS: dict[str, Callable[[], Dataset]] = {
    "breast_cancer": _sklearn_loader("breast_cancer"),
    "diabetes": _load_diabetes,
    "digits": _sklearn_loader("digits"),
    "iris": _sklearn_loader("iris"),
    "wine": _sklearn_loader("wine"),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(_DATASETS)


def load_dataset(name: str | None = None, *, csv: str | os.PathLike | None = None,
                 target: str | None = None) -> Dataset:
    """Load a named dataset, or a CSV file with a header and a ``target`` column."""
    if (name is None) == (csv is None):
        raise UserError(f"give exactly one of a dataset name or a CSV file, got {name=!r}, "
                        f"{csv=!r}")
    if csv is not None:
        if target is None:
            raise UserError(f"a CSV dataset needs a target column, got {target=!r} for {csv!r}")
        return _load_csv(Path(csv), target)
    if name not in _DATASETS:
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _DATASETS[name]()


# ---------------------------------------------------------------- a user's CSV


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and data rows of ``path`` (gzip if it ends in .gz)."""
    if not path.is_file():
        raise UserError(f"CSV file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="") as f:
            rows = [row for row in csvlib.reader(f) if row]  # skip blank lines
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, csvlib.Error) as exc:
        raise UserError(f"cannot read CSV file {str(path)!r}: {exc}") from exc
    if len(rows) < 2:
        raise UserError(f"CSV file {str(path)!r} is empty: it needs a header row and at least "
                        f"one data row, found {len(rows)} row(s)")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise UserError(f"{str(path)!r}: column names must be unique, "
                        f"{', '.join(map(repr, twice))} appear(s) more than once")
    for i, row in enumerate(body, start=2):  # row numbers as a spreadsheet shows them
        if len(row) != len(header):
            raise UserError(f"{str(path)!r}: row {i} has {len(row)} fields, "
                            f"header has {len(header)}")
    return header, body


def _parse_features(path: Path, header: list[str], body: list[list[str]],
                    cols: list[int]) -> np.ndarray:
    X = np.empty((len(body), len(cols)), dtype=np.float64)  # (n, d)
    for i, row in enumerate(body):
        for j, c in enumerate(cols):
            try:
                X[i, j] = float(row[c])
            except ValueError:
                raise UserError(f"{str(path)!r}: row {i + 2}, column {header[c]!r}: "
                                f"non-numeric value {row[c]!r}") from None
            if not math.isfinite(X[i, j]):
                raise UserError(f"{str(path)!r}: row {i + 2}, column {header[c]!r}: "
                                f"NaN or infinite value {row[c]!r}")
    return X.astype(np.float32)


def _encode_target(path: Path, values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Sorted unique values -> classes 0..C-1 (numeric targets sort numerically)."""
    values = [v.strip() for v in values]
    if "" in values:
        raise UserError(f"{str(path)!r}: row {values.index('') + 2} has no target value "
                        "(a missing label)")
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        numbers = None
    if numbers is not None:
        if not all(math.isfinite(x) for x in numbers):
            raise UserError(f"{str(path)!r}: the target column has NaN or infinite values")
        classes = sorted(set(numbers))
        names = tuple(str(int(c)) if c.is_integer() else str(c) for c in classes)
        keys = numbers
    else:
        classes = sorted(set(values))
        names, keys = tuple(classes), values
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[k] for k in keys], dtype=np.int64), names


def _load_csv(path: Path, target: str) -> Dataset:
    header, body = _read_rows(path)
    if target not in header:
        sep = next((c for c in ";\t|" if len(header) == 1 and c in header[0]), None)
        hint = f" (the header looks separated by {sep!r}: widedeep reads comma-separated " \
            "values)" if sep else ""
        raise UserError(f"target column {target!r} not in {str(path)!r}; "
                        f"columns: {', '.join(header)}{hint}")
    t = header.index(target)
    cols = [c for c in range(len(header)) if c != t]
    if not cols:
        raise UserError(f"{str(path)!r} has no feature columns besides target {target!r}")
    X = _parse_features(path, header, body, cols)
    y, class_names = _encode_target(path, [row[t] for row in body])
    if len(class_names) < 2:
        raise UserError(f"{str(path)!r}: target {target!r} needs at least two classes, "
                        f"found {len(class_names)}: {list(class_names)}")
    name = path.name.removesuffix(".gz").removesuffix(".csv")
    return Dataset(name=name, X=X, y=y, class_names=class_names,
                   feature_names=tuple(header[c] for c in cols))


# ---------------------------------------------------------------- splits and scaling


@dataclass(frozen=True)
class Fold:
    """Row indices (int64) of one train/test split."""

    train: np.ndarray
    test: np.ndarray


def parse_split(split: str) -> tuple[str, int]:
    """``"none"`` -> ("none", 1), ``"holdout"`` -> ("holdout", 1), ``"cv:5"`` -> ("cv", 5)."""
    if split in ("none", "holdout"):
        return split, 1
    kind, _, k = split.partition(":")
    if kind == "cv" and k.isdigit() and int(k) >= 2:
        return "cv", int(k)
    raise UserError(f"split must be 'none', 'holdout' or 'cv:K' with K >= 2, got {split!r}")


def make_folds(y: np.ndarray, split: str, *, test_size: float = 0.2,
               seed: int = 0) -> list[Fold]:
    """Stratified, seeded folds of the rows labelled ``y`` (n,).

    The same folds as scikit-learn's ``train_test_split(..., stratify=y, random_state=seed)``
    (holdout) and ``StratifiedKFold(k, shuffle=True, random_state=seed)`` (cv:K), computed
    here: they stay the same whatever scikit-learn is installed, and a run on the lecture
    file never imports it (about a second per process)."""
    kind, k = parse_split(split)
    y = np.asarray(y)
    everything = np.arange(len(y), dtype=np.int64)
    if kind == "none":  # NOTE: the lecture trains and evaluates on the same rows
        return [Fold(train=everything, test=everything)]
    if not 0.0 < test_size < 1.0:
        raise UserError(f"test_size must be in (0, 1), got {test_size!r}")
    _check_class_counts(y, kind, k, test_size)
    if kind == "holdout":
        train, test = _stratified_holdout(y, test_size, seed)
        return [Fold(train=np.sort(train), test=np.sort(test))]
    fold_of = _stratified_fold_of(y, k, seed)
    return [Fold(train=np.flatnonzero(fold_of != i), test=np.flatnonzero(fold_of == i))
            for i in range(k)]


def _approximate_mode(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Rows to draw from each class (summing to ``draws``): the floor of each class's share,
    then one more for the largest remainders, ties broken at random."""
    share = counts / counts.sum() * draws
    out = np.floor(share)
    missing = int(draws - out.sum())
    remainder = share - out
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        out[chosen] += 1
        missing -= len(chosen)
    return out.astype(int)


def _stratified_holdout(y: np.ndarray, test_size: float,
                        seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices, unsorted: ceil(test_size n) test rows, each class split in
    proportion (as scikit-learn's StratifiedShuffleSplit draws its first split)."""
    n_test = math.ceil(test_size * len(y))
    _, classes, counts = np.unique(y, return_inverse=True, return_counts=True)
    by_class = np.split(np.argsort(classes, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_train = _approximate_mode(counts, len(y) - n_test, rng)
    n_held = _approximate_mode(counts - n_train, n_test, rng)
    train, test = [], []
    for rows, a, b in zip(by_class, n_train, n_held, strict=True):
        rows = rows[rng.permutation(len(rows))]
        train.append(rows[:a])
        test.append(rows[a:a + b])
    return np.concatenate(train), np.concatenate(test)


def _stratified_fold_of(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) whose test part holds each row: each class's rows dealt to the folds
    as evenly as the class sizes allow, shuffled (as scikit-learn's StratifiedKFold with
    shuffle=True)."""
    _, first, inverse = np.unique(y, return_index=True, return_inverse=True)
    _, rank = np.unique(first, return_inverse=True)
    label = rank[inverse]  # classes numbered in order of first appearance
    ordered = np.sort(label)
    per_fold = np.array([np.bincount(ordered[i::k], minlength=len(first)) for i in range(k)])
    rng = np.random.RandomState(seed)
    fold_of = np.empty(len(y), dtype=np.int64)
    for c in range(len(first)):
        folds = np.arange(k).repeat(per_fold[:, c])
        rng.shuffle(folds)
        fold_of[label == c] = folds
    return fold_of


def _check_class_counts(y: np.ndarray, kind: str, k: int, test_size: float) -> None:
    """Refuse splits that sklearn would refuse (or only warn about) with a clearer message."""
    labels, counts = np.unique(y, return_counts=True)
    found = dict(zip(labels.tolist(), counts.tolist(), strict=True))  # class -> rows
    need = k if kind == "cv" else 2
    if len(y) < need or counts.size == 0 or counts.min() < need:
        raise UserError(f"split {kind}{':' + str(k) if kind == 'cv' else ''} needs at least "
                        f"{need} rows of every class, got {len(y)} rows with class counts "
                        f"{found}")
    if kind == "holdout":
        n_test = math.ceil(test_size * len(y))
        if n_test < len(labels) or len(y) - n_test < len(labels):
            raise UserError(f"holdout with test_size={test_size!r} on {len(y)} rows gives "
                            f"{n_test} test rows, fewer than the {len(labels)} classes "
                            f"(class counts {found})")


def standardize(X_train: np.ndarray, X_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Z-score both with the mean and std of ``X_train`` (n, d); constant columns keep std 1."""
    mean = X_train.mean(axis=0, dtype=np.float64)  # (d,)
    std = X_train.std(axis=0, dtype=np.float64)  # (d,)
    std[std == 0] = 1.0
    return (((X_train - mean) / std).astype(np.float32),
            ((X_test - mean) / std).astype(np.float32))
