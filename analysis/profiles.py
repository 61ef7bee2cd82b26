"""Report profiles: how much training each section of the report asks for.

``quick`` (the default, and the committed ``results/``) must finish within 15 minutes on a
2-core CPU; ``full`` uses more seeds, depths and epochs; ``tiny`` exists for the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from widedeep.activations import list_activations
from widedeep.errors import UserError

# NOTE: the lecture trains with SGD lr 0.1 and reports training loss. For the comparison
# grid we use Adam lr 0.01 on a stratified holdout: fast, and honest about overfitting.
RECIPE = {"optimizer": "adam", "lr": 0.01}


@dataclass(frozen=True, kw_only=True)
class Profile:
    name: str
    # 1. lecture: the 100-epoch run, then much longer runs to see it leave the plateau
    plateau_epochs: int
    plateau_seeds: int
    # 2./3. activation x depth x width grid on diabetes (None = every registered activation)
    activations: tuple[str, ...] | None
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    seeds: int
    epochs: int
    grad_depth: int  # the deep net whose per-layer gradients section 3 shows
    # 3. initialisations compared on one deep net
    init_activations: tuple[str, ...] = ("sigmoid", "tanh", "relu", "selu")
    inits: tuple[str, ...] = ("default", "xavier", "kaiming", "lecun")
    init_width: int = 64
    # 5. the exercise-7-1 search
    search_trials: int = 30
    search_split: str = "cv:5"
    search_max_depth: int = 32
    search_max_epochs: int = 100
    # a safety net: the trial count should bind first (the search shares the CPU with the
    # sweeps of the sections that run beside it)
    search_timeout_s: float | None = 600.0
    # 4./6. other datasets
    datasets: tuple[str, ...] = ("breast_cancer", "wine", "iris", "digits")
    multiclass: tuple[str, ...] = ("digits", "wine")
    ds_activations: tuple[str, ...] = ("relu", "tanh", "sigmoid", "selu", "gelu")
    ds_depths: tuple[int, ...] = (1, 2, 4, 8)
    ds_width: int = 32
    ds_seeds: int = 2
    ds_split: str = "holdout"
    recipe: dict = field(default_factory=lambda: dict(RECIPE))
    # "plain" trains every net on the plain loop (to time the batched engine against it)
    engine: str = "auto"

    def grid_activations(self) -> list[str]:
        return list(self.activations) if self.activations else list_activations()


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny", plateau_epochs=60, plateau_seeds=2,
        activations=("relu", "sigmoid"), depths=(1, 2), widths=(8,), seeds=2, epochs=5,
        grad_depth=2, init_activations=("sigmoid", "relu"), inits=("default", "xavier"),
        init_width=8, search_trials=3, search_split="holdout", search_max_epochs=5,
        datasets=("iris", "wine"), multiclass=("iris",), ds_activations=("relu", "tanh"),
        ds_depths=(1, 2), ds_width=8, ds_seeds=1,
    ),
    "quick": Profile(
        name="quick", plateau_epochs=5000, plateau_seeds=5,
        activations=None, depths=(1, 2, 4, 8, 12, 16, 32), widths=(6, 64), seeds=2,
        epochs=100, grad_depth=16,
    ),
    "full": Profile(
        name="full", plateau_epochs=20000, plateau_seeds=10,
        activations=None, depths=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48), widths=(6, 16, 64),
        seeds=5, epochs=200, grad_depth=32, search_trials=200, search_max_epochs=300,
        search_timeout_s=None, ds_depths=(1, 2, 4, 8, 16),
        ds_activations=("relu", "tanh", "sigmoid", "selu", "gelu", "elu", "silu", "mish"),
        ds_seeds=5, ds_split="cv:5",
    ),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; an unknown name raises with the known ones."""
    if name not in PROFILES:
        raise UserError(f"unknown report profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
