"""Activation registry: every hidden-layer non-linearity widedeep can build, by name.

Each entry is an :class:`ActivationSpec`: a factory that returns a *fresh* module (so every
layer owns its own instance, with its own parameters and its own forward hooks), the
``nn.init`` non-linearity used to pick an initialisation gain, and whether the function acts
element by element.

Parameters PyTorch requires, and the values widedeep uses:

- ``threshold``: ``nn.Threshold(threshold=0.1, value=0.0)`` — y = x if x > 0.1 else 0.
  (With threshold 0 and value 0 it would be ReLU under another name.)
- ``softmax``, ``softmin``, ``logsoftmax``: ``dim=-1``, the feature dimension of a
  ``(batch, width)`` activation — each sample's hidden units compete with each other.
- ``prelu``: one learnable slope per layer (PyTorch's default, initialised to 0.25).
- ``rrelu``: slopes drawn from U(1/8, 1/3) in training, their mean in evaluation.
- everything else: PyTorch's defaults (``leakyrelu`` slope 0.01, ``elu``/``celu`` alpha 1,
  ``softplus`` beta 1, ``softshrink`` lambda 0.5, ``hardtanh`` range [-1, 1]).

Saturation (used by the activation-statistics probe) is defined from the activation's
local slope, the same way for every family: an entry is *saturated* when
``|d act(z) / dz|`` is below 1 % of the largest slope the activation reaches (sigmoid:
|z| > ~6.9, i.e. outputs within 0.1 % of 0 or 1; tanh: |z| > ~3.0; ReLU: z <= 0). For the
softmax family the slope is the diagonal of the Jacobian. A unit is *dead* when it is
saturated on every sample of the batch: it passes (almost) no gradient for any input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from widedeep.errors import UserError

SLOPE_FRACTION = 0.01  # "saturated" = slope below this fraction of the activation's max slope


@dataclass(frozen=True, kw_only=True)
class ActivationSpec:
    name: str
    factory: Callable[[], nn.Module]
    nonlinearity: str  # argument for torch.nn.init.calculate_gain
    gain_param: float | None = None
    elementwise: bool = True
    doc: str = ""

    def create(self) -> nn.Module:
        """A fresh module; never share one instance between layers."""
        return self.factory()

    def gain(self) -> float:
        """Initialisation gain matched to this activation (torch.nn.init.calculate_gain)."""
        return nn.init.calculate_gain(self.nonlinearity, self.gain_param)


_REGISTRY: dict[str, ActivationSpec] = {}
_MAX_SLOPE: dict[str, float] = {}


def register_activation(spec: ActivationSpec) -> ActivationSpec:
    """Add ``spec`` to the registry; a name can be registered only once."""
    if spec.name in _REGISTRY:
        raise ValueError(f"activation {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_activations() -> list[str]:
    """Names of every registered activation, sorted."""
    return sorted(_REGISTRY)


def get_activation(name: str) -> ActivationSpec:
    """The spec registered under ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise UserError(f"unknown activation {name!r}; known: {', '.join(list_activations())}")
    return _REGISTRY[key]


def create_activation(name: str) -> nn.Module:
    """A fresh activation module for one layer."""
    return get_activation(name).create()


def slope(spec: ActivationSpec, module: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """|d act / dz| per entry of ``pre`` (batch, width), for the diagnostics probe only."""
    z = pre.detach()
    if not spec.elementwise:
        # NOTE: diagonal of the Jacobian of softmax-family outputs over dim=-1.
        p = torch.softmax(-z if spec.name == "softmin" else z, dim=-1)
        return 1.0 - p if spec.name == "logsoftmax" else p * (1.0 - p)
    with torch.enable_grad():
        z = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(module.forward(z).sum(), z)  # no hooks
    return g.abs()


def max_slope(spec: ActivationSpec) -> float:
    """The largest |slope| of the activation, read off a dense grid once and cached."""
    if spec.name not in _MAX_SLOPE:
        grid = torch.linspace(-20.0, 20.0, 40001).unsqueeze(1)  # (n, 1)
        if not spec.elementwise:
            grid = torch.cat([grid, torch.zeros_like(grid)], dim=1)  # (n, 2): one rival unit
        module = spec.create().eval()
        _MAX_SLOPE[spec.name] = float(slope(spec, module, grid).max())
    return _MAX_SLOPE[spec.name]


def saturated(spec: ActivationSpec, module: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, width): entries whose slope is below SLOPE_FRACTION of the maximum."""
    return slope(spec, module, pre) < SLOPE_FRACTION * max_slope(spec)


def _add(name, factory, nonlinearity="relu", gain_param=None, *, elementwise=True, doc=""):
    register_activation(
        ActivationSpec(
            name=name,
            factory=factory,
            nonlinearity=nonlinearity,
            gain_param=gain_param,
            elementwise=elementwise,
            doc=doc,
        )
    )


# The lecture's list (every non-linear one), then modern additions.
_add("relu", nn.ReLU, doc="max(0, x)")
_add("relu6", nn.ReLU6, doc="min(max(0, x), 6)")
_add("elu", nn.ELU, doc="x if x > 0 else exp(x) - 1 (alpha 1)")
_add("selu", nn.SELU, "selu", doc="scaled ELU; self-normalising with init=lecun")
_add("prelu", nn.PReLU, "leaky_relu", 0.25, doc="leaky ReLU with a learnable slope (init 0.25)")
_add("leakyrelu", nn.LeakyReLU, "leaky_relu", 0.01, doc="x if x > 0 else 0.01 x")
_add(
    "threshold",
    lambda: nn.Threshold(0.1, 0.0),
    doc="x if x > 0.1 else 0 (threshold=0.1, value=0)",
)
_add("hardtanh", nn.Hardtanh, "tanh", doc="clamp(x, -1, 1)")
_add("sigmoid", nn.Sigmoid, "sigmoid", doc="1 / (1 + exp(-x)); the lecture's activation")
_add("tanh", nn.Tanh, "tanh", doc="tanh(x)")
_add("logsigmoid", nn.LogSigmoid, "sigmoid", doc="log(sigmoid(x))")
_add("softplus", nn.Softplus, doc="log(1 + exp(x))")
_add("softshrink", nn.Softshrink, "linear", doc="x - 0.5 sign(x) outside [-0.5, 0.5], else 0")
_add("softsign", nn.Softsign, "tanh", doc="x / (1 + |x|)")
_add("tanhshrink", nn.Tanhshrink, "linear", doc="x - tanh(x)")
_add(
    "softmin",
    lambda: nn.Softmin(dim=-1),
    "sigmoid",
    elementwise=False,
    doc="softmin over the feature dimension (dim=-1)",
)
_add(
    "softmax",
    lambda: nn.Softmax(dim=-1),
    "sigmoid",
    elementwise=False,
    doc="softmax over the feature dimension (dim=-1)",
)
_add(
    "logsoftmax",
    lambda: nn.LogSoftmax(dim=-1),
    "linear",
    elementwise=False,
    doc="log-softmax over the feature dimension (dim=-1)",
)
_add("gelu", nn.GELU, doc="x * Phi(x) (exact erf form)")
_add("silu", nn.SiLU, doc="x * sigmoid(x), a.k.a. swish")
_add("mish", nn.Mish, doc="x * tanh(softplus(x))")
_add("hardswish", nn.Hardswish, doc="x * relu6(x + 3) / 6")
_add("hardsigmoid", nn.Hardsigmoid, "sigmoid", doc="relu6(x + 3) / 6")
_add("celu", nn.CELU, doc="continuously differentiable ELU (alpha 1)")
_add("rrelu", nn.RReLU, "leaky_relu", (1 / 8 + 1 / 3) / 2, doc="randomised leaky ReLU")
