"""Run configuration: one frozen dataclass, built from options and validated once, at the edge.

``make_config(**options)`` is the single entry point used by the CLI, sweeps and the search:
it accepts every ``widedeep train`` option (``depth``/``width`` as an alternative to
``widths``, ``preset`` for a named starting point) and rejects unknown or ill-typed values
with a :class:`~widedeep.errors.UserError` that names them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from widedeep.activations import get_activation
from widedeep.errors import UserError

ARCHS = ("mlp", "widedeep")
INITS = ("default", "xavier", "kaiming", "lecun")
NORMS = ("none", "batch", "layer")
OPTIMIZERS = ("sgd", "adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("auto", "plain", "batched")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # data
    dataset: str = "diabetes"
    csv: str | None = None
    target: str | None = None
    split: str = "holdout"
    test_size: float = 0.2
    standardize: bool = True
    # model
    arch: str = "mlp"
    cross: bool = False
    widths: tuple[int, ...] = (6, 4)
    activation: str = "sigmoid"
    init: str = "default"
    norm: str = "none"
    residual: bool = False
    dropout: float = 0.0
    # training
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 100
    batch_size: int | None = None  # None = full batch
    patience: int | None = None  # early stopping on a validation split; None = off
    seed: int = 0
    device: str = "auto"
    engine: str = "auto"
    threads: int | None = None  # CPU threads; None = auto (see widedeep.run.resolve_threads)
    # probes
    probe_epochs: tuple[int, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# NOTE: the lecture's model and training exactly: 8-6-4-1 sigmoid, mean BCE, SGD lr 0.1,
# 100 full-batch epochs, trained and reported on all rows, raw (unscaled) features.
PRESETS: dict[str, dict[str, Any]] = {
    "lecture": dict(
        dataset="diabetes",
        split="none",
        standardize=False,
        arch="mlp",
        widths=(6, 4),
        activation="sigmoid",
        init="default",
        norm="none",
        residual=False,
        dropout=0.0,
        optimizer="sgd",
        lr=0.1,
        momentum=0.0,
        weight_decay=0.0,
        epochs=100,
        batch_size=None,
        patience=None,
    ),
}

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
OPTION_NAMES = tuple(sorted(set(_FIELDS) | {"depth", "width", "preset"}))


def make_config(**options: Any) -> TrainConfig:
    """Build and validate a config from train options (``None`` values mean "not given")."""
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
    preset = options.pop("preset", None)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    values.update(_resolve_widths(options))
    values.update({k: _coerce(k, v) for k, v in options.items()})
    if values.get("batch_size") == "full":
        values["batch_size"] = None
    config = TrainConfig(**values)
    validate(config)
    return config


def _resolve_widths(options: dict[str, Any]) -> dict[str, Any]:
    depth, width = options.pop("depth", None), options.pop("width", None)
    if depth is None and width is None:
        return {}
    if "widths" in options:
        raise UserError("give either --widths or --depth/--width, not both")
    depth = _as_int("depth", depth if depth is not None else 2)
    width = _as_int("width", width if width is not None else 6)
    if depth < 1:
        raise UserError(f"depth must be >= 1, got depth={depth}")
    if width < 1:
        raise UserError(f"width must be >= 1, got width={width}")
    return {"widths": (width,) * depth}


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise UserError(f"{name} must be an integer, got {name}={value!r}")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {name}={value!r}") from None


def _coerce(name: str, value: Any) -> Any:
    """Check the type of one option against the dataclass field (ints accepted for floats)."""
    kind = _FIELDS[name].type
    if name in ("widths", "probe_epochs"):
        if isinstance(value, str):
            items = value.replace(" ", "").split(",")
            if any(not v for v in items) and value.strip():
                raise UserError(f"{name} has an empty item: {name}={value!r}")
            value = [v for v in items if v]
        if not isinstance(value, list | tuple):
            raise UserError(f"{name} must be a list of integers, got {name}={value!r}")
        return tuple(_as_int(name, v) for v in value)
    if name == "batch_size" and value == "full":
        return "full"
    if "float" in kind and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if "int" in kind and isinstance(value, int) and not isinstance(value, bool):
        return value
    if "bool" in kind and isinstance(value, bool):
        return value
    if "str" in kind and isinstance(value, str):
        return value
    raise UserError(f"option {name} has the wrong type: got {name}={value!r}, expected {kind}")


def validate(c: TrainConfig) -> None:
    """Raise UserError naming the first bad value in ``c``."""
    _one_of("arch", c.arch, ARCHS)
    _one_of("init", c.init, INITS)
    _one_of("norm", c.norm, NORMS)
    _one_of("optimizer", c.optimizer, OPTIMIZERS)
    _one_of("device", c.device, DEVICES)
    _one_of("engine", c.engine, ENGINES)
    get_activation(c.activation)
    if not c.widths or any(w < 1 for w in c.widths):
        raise UserError(f"every hidden width must be >= 1, got widths={list(c.widths)}")
    checks = [
        ("lr", c.lr > 0),
        ("epochs", c.epochs >= 1),
        ("test_size", 0 < c.test_size < 1),
        ("dropout", 0 <= c.dropout < 1),
        ("momentum", 0 <= c.momentum < 1),
        ("weight_decay", c.weight_decay >= 0),
        ("batch_size", c.batch_size is None or c.batch_size >= 1),
        ("patience", c.patience is None or c.patience >= 1),
        ("seed", c.seed >= 0),
        ("threads", c.threads is None or c.threads >= 1),
    ]
    for name, ok in checks:
        if not ok:
            raise UserError(f"{name} out of range: {name}={getattr(c, name)!r}")
    if any(e < 0 or e > c.epochs for e in c.probe_epochs):
        raise UserError(f"probe epochs must lie in 0..{c.epochs}, got {list(c.probe_epochs)}")
    if c.csv is not None and c.target is None:
        raise UserError("--csv needs --target COLUMN")
    if c.momentum and c.optimizer != "sgd":
        raise UserError(f"momentum applies to sgd only, got optimizer={c.optimizer!r}")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"unknown {name} {value!r}; choose from {', '.join(allowed)}")
