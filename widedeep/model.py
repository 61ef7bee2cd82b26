"""Models: a plain MLP, and Wide & Deep (Cheng et al. 2016), both ending in a linear layer.

The output layer is linear: the sigmoid (two classes, one logit) or softmax (more classes,
one logit each) lives in the loss. Every hidden block owns a fresh activation module, so a
module path such as ``blocks.3.activation`` names exactly one layer's activation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from widedeep.activations import get_activation
from widedeep.config import TrainConfig


def n_outputs(n_classes: int) -> int:
    """One logit for two classes (BCE-with-logits), one per class otherwise."""
    return 1 if n_classes == 2 else n_classes


class Block(nn.Module):
    """Linear -> (norm) -> activation -> (dropout), with an optional identity shortcut."""

    def __init__(self, n_in: int, n_out: int, activation: str, *, norm: str, residual: bool,
                 dropout: float):
        super().__init__()
        spec = get_activation(activation)
        self.linear = nn.Linear(n_in, n_out)
        self.norm = {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
        self.norm = self.norm() if norm == "none" else self.norm(n_out)
        self.activation = spec.create()
        # NOTE: alpha dropout keeps SELU's self-normalising mean and variance.
        drop = nn.AlphaDropout if spec.name == "selu" else nn.Dropout
        self.dropout = drop(dropout) if dropout > 0 else nn.Identity()
        self.residual = residual and n_in == n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, n_in) -> (batch, n_out)
        h = self.dropout(self.activation(self.norm(self.linear(x))))
        return x + h if self.residual else h


class MLP(nn.Module):
    """``len(widths)`` hidden blocks, then a linear head producing logits."""

    def __init__(self, n_in: int, widths: tuple[int, ...], n_out: int, activation: str, *,
                 norm: str = "none", residual: bool = False, dropout: float = 0.0):
        super().__init__()
        sizes = (n_in, *widths)
        self.blocks = nn.ModuleList(
            Block(a, b, activation, norm=norm, residual=residual, dropout=dropout)
            for a, b in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.head = nn.Linear(sizes[-1], n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, n_in) -> (batch, n_out)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def cross_features(x: torch.Tensor) -> torch.Tensor:
    """Pairwise products x_i * x_j for i < j: (batch, d) -> (batch, d (d - 1) / 2)."""
    i, j = torch.triu_indices(x.shape[1], x.shape[1], offset=1, device=x.device)
    return x[:, i] * x[:, j]


class WideDeep(nn.Module):
    """Wide & Deep: a linear model on the raw (and optionally crossed) features whose logit
    is added to the deep MLP's logit; both parts are trained jointly."""

    def __init__(self, n_in: int, widths: tuple[int, ...], n_out: int, activation: str, *,
                 cross: bool = False, **mlp_options):
        super().__init__()
        self.cross = cross
        n_wide = n_in + (n_in * (n_in - 1) // 2 if cross else 0)
        self.wide = nn.Linear(n_wide, n_out)
        self.deep = MLP(n_in, widths, n_out, activation, **mlp_options)

    def wide_logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.cat([x, cross_features(x)], dim=1) if self.cross else x)

    def deep_logit(self, x: torch.Tensor) -> torch.Tensor:
        return self.deep(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide_logit(x) + self.deep_logit(x)


def build_model(config: TrainConfig, n_features: int, n_classes: int) -> nn.Module:
    """The model ``config`` describes, initialised as ``config.init`` says (CPU, float32)."""
    options = dict(norm=config.norm, residual=config.residual, dropout=config.dropout)
    n_out = n_outputs(n_classes)
    if config.arch == "widedeep":
        model = WideDeep(n_features, config.widths, n_out, config.activation,
                         cross=config.cross, **options)
    else:
        model = MLP(n_features, config.widths, n_out, config.activation, **options)
    initialize(model, config.init, config.activation)
    return model


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The deep path's Linear layers from input to output (the wide part is not a layer)."""
    mlp = model.deep if isinstance(model, WideDeep) else model
    prefix = "deep." if isinstance(model, WideDeep) else ""
    layers = [(f"{prefix}blocks.{i}.linear", b.linear) for i, b in enumerate(mlp.blocks)]
    return layers + [(f"{prefix}head", mlp.head)]


def initialize(model: nn.Module, scheme: str, activation: str) -> None:
    """Re-initialise hidden and output Linear weights; ``default`` keeps PyTorch's init.

    xavier: N(0, gain * sqrt(2 / (fan_in + fan_out))); kaiming: N(0, gain / sqrt(fan_in));
    lecun: N(0, 1 / sqrt(fan_in)) — the self-normalising recipe for SELU. The gain is the
    activation's (``ActivationSpec.gain``); the output layer uses gain 1. Biases are zeroed.
    """
    if scheme == "default":
        return
    gain = get_activation(activation).gain()
    layers = linear_layers(model)
    for k, (_, layer) in enumerate(layers):
        fan_out, fan_in = layer.weight.shape
        g = 1.0 if k == len(layers) - 1 else gain
        std = {
            "xavier": g * math.sqrt(2.0 / (fan_in + fan_out)),
            "kaiming": g / math.sqrt(fan_in),
            "lecun": 1.0 / math.sqrt(fan_in),
        }[scheme]
        with torch.no_grad():
            layer.weight.normal_(0.0, std)
            layer.bias.zero_()


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(stable name, module) of each hidden layer's activation, input to output."""
    return [(name, m) for name, m in model.named_modules() if name.endswith(".activation")]


def layer_sizes(n_features: int, widths, n_out: int) -> list[tuple[int, int]]:
    """(in, out) of each Linear layer of a plain MLP, input to head, without building it."""
    sizes = (n_features, *widths, n_out)
    return list(zip(sizes[:-1], sizes[1:], strict=True))


def step_flops(sizes, n: int) -> int:
    """Analytic FLOPs of one training step on ``n`` rows through Linear layers (in, out).

    Forward: 2 * n * sum(in * out) (one multiply-add per weight per row); backward is about
    twice the forward (grads w.r.t. inputs and weights). Activations and the optimiser's
    update are O(width) per row and left out.
    """
    return 3 * 2 * n * sum(a * b for a, b in sizes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
