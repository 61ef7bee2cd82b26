"""Batched engine, part 1: K MLPs of one shape as stacked tensors, and their optimisers.

Every model's parameters live in one row of a flat ``(K, P)`` tensor, in the order of
``model.parameters()``; each layer's weight is a *view* of it, shaped ``(K, out, in)``. Hidden
activations are kept feature-major, ``(K, width, n)``, so that the sample axis is the long,
contiguous one: elementwise ops stream, and with data shared by all models the first layer
is one plain matrix product ``(K * width, d) @ (d, n)``.

Models never interact: the loss that is differentiated is the *sum* of the K per-model mean
losses, so each model's gradient is exactly its own. Optimisers are elementwise, so one step
on the flat tensor (with per-model lr, momentum and weight decay as ``(K, 1)`` columns) is K
independent steps, written out here to follow ``torch.optim``'s update rules.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widedeep.activations import SLOPE_FRACTION, get_activation, max_slope, saturated
from widedeep.config import TrainConfig
from widedeep.model import WideDeep

# Options that change what the engine computes; a group shares all of them. The rest
# (seed, init, lr, momentum, weight_decay, engine) may differ from model to model.
SHAPE_FIELDS = ("dataset", "csv", "target", "split", "test_size", "standardize", "arch",
                "cross", "widths", "activation", "norm", "residual", "dropout", "optimizer",
                "epochs", "batch_size", "patience", "device", "probe_epochs")


def unsupported_reason(config: TrainConfig) -> str | None:
    """Why ``config`` needs the plain loop, or None when the batched engine can train it."""
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        # NOTE: each model draws from its own copy of the plain loop's stream, on the CPU.
        if config.dropout > 0:
            return f"dropout {config.dropout} on CUDA (random masks drawn model by model)"
        if config.activation == "rrelu":
            return "activation rrelu on CUDA (random slopes drawn model by model)"
    return None


def group_key(config: TrainConfig) -> tuple:
    """Configs with equal keys can be trained together."""
    return tuple(getattr(config, name) for name in SHAPE_FIELDS)


@dataclass(frozen=True)
class Layout:
    """Where each parameter sits in a model's flat row, and how the blocks are wired."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    activation: str
    norm: str  # "none" | "layer"
    residual: tuple[bool, ...]  # per hidden block
    dropout: float = 0.0  # after each hidden activation (alpha dropout after selu)
    wide: bool = False  # Wide & Deep: a linear model on the inputs adds to the logits
    cross: bool = False  # ... whose inputs include the pairwise products of the features

    @property
    def n_params(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def offsets(self) -> dict[str, int]:
        """name -> the column where that parameter starts in a model's flat row."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            out[name] = offset
            offset += _numel(shape)
        return out

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> (K, *shape) view into ``flat`` (K, P); biases come out as (K, out, 1)."""
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = _numel(shape)
            view = flat[:, offset:offset + size]
            out[name] = view.reshape(-1, *shape, 1) if len(shape) == 1 else view.reshape(
                -1, *shape)
            offset += size
        return out

    def weight_slices(self) -> list[slice]:
        """Column ranges of the Linear weights, input layer to head (for grad norms)."""
        slices, offset = [], 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            if name.endswith("linear.weight") or name == "head.weight":
                slices.append(slice(offset, offset + _numel(shape)))
            offset += _numel(shape)
        return slices

    @property
    def depth(self) -> int:
        return len(self.residual)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layout_of(model: nn.Module, config: TrainConfig) -> Layout:
    """A plain MLP's layout, or Wide & Deep's: its deep part's names without "deep."."""
    named = list(model.named_parameters())
    wide = isinstance(model, WideDeep)
    blocks = model.deep.blocks if wide else model.blocks
    residual = tuple(bool(block.residual) for block in blocks)
    return Layout(names=tuple(n.removeprefix("deep.") for n, _ in named),
                  shapes=tuple(tuple(p.shape) for _, p in named),
                  activation=config.activation, norm=config.norm, residual=residual,
                  dropout=config.dropout, wide=wide, cross=wide and config.cross)


def stack(models: list[nn.Module]) -> torch.Tensor:
    """(K, P): row k holds model k's parameters, flattened in ``parameters()`` order."""
    return torch.stack([nn.utils.parameters_to_vector(m.parameters()).detach()
                        for m in models])


@torch.no_grad()
def unstack(flat: torch.Tensor, models: list[nn.Module]) -> None:
    """Write row k of ``flat`` (K, P) back into model k."""
    for row, model in zip(flat, models, strict=True):
        nn.utils.vector_to_parameters(row.detach().clone(), model.parameters())


class StackedActivation:
    """Applies the activation to (K, width, n); softmax-family ones act over the width.

    Two activations carry state per model: prelu's learnable slope (one per layer, a
    parameter in the flat row, passed in as ``weight`` (K, 1, 1)), and rrelu's random
    slopes, drawn in training only, model k from ``generators[k]`` (None: that model is
    evaluated, with the mean slope). Each model draws its slopes over its own (rows, width)
    pre-activations in row-major order, from its own stream, as the plain loop draws them.
    ``generators`` (set by :meth:`drawing`) also feed :func:`dropout`'s masks in training.
    """

    def __init__(self, name: str):
        self.spec = get_activation(name)
        self.module = self.spec.create()
        if self.spec.name == "rrelu":
            self.module.eval()  # the probes' slopes: never a draw from the global stream
        # per-model streams of rrelu's slopes and dropout's masks, set in training only
        self.generators: list[torch.Generator | None] | None = None
        self.probing = False

    @property
    def alpha_dropout(self) -> bool:
        """Whether dropout after it is alpha dropout (after selu, as in widedeep.model)."""
        return self.spec.name == "selu"

    def __call__(self, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if self.spec.name == "prelu":
            return prelu(z, weight)
        if self.spec.name == "rrelu" and self.generators is not None:
            return self.rrelu(z)[0]
        if self.spec.elementwise:
            return self.module(z)
        return self.module(z.transpose(1, 2)).transpose(1, 2)  # dim=-1 is the width

    @contextmanager
    def drawing(self, generators: list[torch.Generator | None] | None, *, probing: bool = False):
        """Inside, rrelu's slopes and dropout's masks come from ``generators`` (per model;
        None: that model is evaluated); ``probing`` replays the plain probe's extra draws."""
        saved = self.generators, self.probing
        self.generators, self.probing = generators, probing
        try:
            yield
        finally:
            self.generators, self.probing = saved

    def rrelu(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rrelu of z (K, width, n), each model drawing from its generator; returns the
        output and the slopes applied (1 where z > 0), both (K, width, n)."""
        lower, upper = self.module.lower, self.module.upper
        rows = z.transpose(1, 2).contiguous()  # (K, n, width): the plain loop's memory order
        outs, noises = [], []
        for zk, g in zip(rows, self.generators, strict=True):
            noise = torch.empty_like(zk)
            outs.append(torch._C._nn.rrelu_with_noise(zk, noise, lower, upper, g is not None, g))
            if self.probing and g is not None:
                # NOTE: the plain probe's saturation hook runs the module once more on the
                # same pre-activation (inside the probe's forked stream), drawing as many
                # slopes again before the next layer's draws.
                torch._C._nn.rrelu_with_noise(zk.detach(), torch.empty_like(zk), lower, upper,
                                              True, g)
            noises.append(noise if g is not None else torch.where(zk > 0, 1.0, (lower + upper) / 2))
        return torch.stack(outs).transpose(1, 2), torch.stack(noises).transpose(1, 2)

    def saturated(self, z: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """(K, n, width) bool for pre-activations z (K, width, n)."""
        if self.spec.name == "prelu":  # slope 1 above zero, |weight| at and below it
            slope = torch.where(z > 0, 1.0, weight.abs().expand_as(z))
            return (slope < SLOPE_FRACTION * max_slope(self.spec)).transpose(1, 2)
        return saturated(self.spec, self.module, z.transpose(1, 2))


ALPHA_DROPOUT = 1.7580993408473766  # torch's alpha dropout: SELU_SCALE * SELU_ALPHA


def dropout(a: torch.Tensor, p: float, alpha: bool, generators: list[torch.Generator | None],
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout (alpha dropout when ``alpha``) of a (K, width, n), model k's mask drawn from
    ``generators[k]`` (None: that model is evaluated, nothing dropped); returns the output and
    the factor its gradient is multiplied by, (K, width, n).

    Each mask is drawn as torch draws it, over the model's (rows, width) in row-major order,
    and scaled by the same operations, so every entry equals the plain loop's.
    """
    K, width, n = a.shape
    drawn = _compiled_masks(width, n, p, alpha, generators) if a.device.type == "cpu" else None
    noise, shift = drawn or dropout_masks(width, n, p, alpha, generators, a.device)
    out = a * noise
    if alpha:
        out = out + shift
    return out, noise


def _compiled_masks(width: int, n: int, p: float, alpha: bool,
                    generators: list[torch.Generator | None],
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """:func:`dropout_masks` by the compiled step's draw of torch's generator (~10x faster
    than bernoulli_; the same masks and generator states), or None where it is not to be had
    (no compiler, WIDEDEEP_FUSED=0, a torch whose generator it does not know)."""
    from widedeep import fused  # it imports this module

    lib = fused.library()
    return None if lib is None else fused.draw_masks(lib, [width], n, p, alpha, generators)


def dropout_masks(width: int, n: int, p: float, alpha: bool,
                  generators: list[torch.Generator | None], device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What :func:`dropout` applies to a (K, width, n), one model per generator: the factor
    (K, width, n) and, for alpha dropout, the shift added after it (else None)."""
    noises, shifts = [], []
    for g in generators:
        noise = torch.empty(n, width, device=device)  # the plain loop's (batch, width)
        if g is None:
            noises.append(noise.fill_(1.0)), shifts.append(torch.zeros_like(noise))
            continue
        factor, shift = mask_values(noise.bernoulli_(1 - p, generator=g), p, alpha)
        noises.append(factor), shifts.append(shift)
    shift = torch.stack(shifts).transpose(1, 2) if alpha else None
    return torch.stack(noises).transpose(1, 2), shift


def mask_values(mask: torch.Tensor, p: float, alpha: bool,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dropout's factor (``mask`` of 0s and 1s, scaled in place) and, for alpha dropout,
    the shift added after it (else None), by the operations torch's dropout uses."""
    if not alpha:
        return mask.div_(1 - p), None
    scale = 1.0 / math.sqrt((ALPHA_DROPOUT * ALPHA_DROPOUT * p + 1) * (1 - p))
    shift = mask.add(-1).mul_(ALPHA_DROPOUT * scale).add_(ALPHA_DROPOUT * scale * p)
    return mask.mul_(scale), shift


def prelu(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z if z > 0 else weight * z, with torch's prelu kernel; weight (K, 1, 1) per model."""
    return torch.ops.aten._prelu_kernel(z, weight)


def linear(W: torch.Tensor, b: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W (K, out, in), b (K, out, 1), h (in, n) shared or (K, in, n) -> (K, out, n)."""
    if h.dim() == 2:
        K, out, n_in = W.shape
        bias = b.reshape(K * out, 1)  # one GEMM for all K, bias added by addmm
        return torch.addmm(bias, W.reshape(K * out, n_in), h).view(K, out, -1)
    return torch.baddbmm(b, W, h)


def _layer_norm(z: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the width of z (K, width, n) with affine g, beta (K, width, 1)."""
    width = z.shape[1]
    normed = F.layer_norm(z.transpose(1, 2), (width,), eps=1e-5).transpose(1, 2)
    return torch.addcmul(beta, normed, g)


class BatchNorms:
    """The batch-norm layers of K stacked models: their running statistics, and the mode
    they normalise in, per model.

    Each layer runs torch's own batch-norm kernel on its (K, width, n) pre-activations seen
    as one sample of K * width channels over n rows: in training, each model's unit is
    normalised by its own batch mean and biased variance, and (``update``) its running mean
    and unbiased variance move towards them by ``momentum``; in evaluation, by its running
    statistics -- as each model's ``nn.BatchNorm1d`` would. The mode is per model
    (``training``: a bool, or a (K,) bool tensor): a probe evaluates the models whose plain
    loop has just run a validation pass.
    """

    def __init__(self, models: list[nn.Module]):
        norms = [_batch_norms(model) for model in models]
        self.momentum, self.eps = norms[0][0].momentum, norms[0][0].eps
        self.widths = [m.num_features for m in norms[0]]
        self.means = [torch.stack([ms[i].running_mean for ms in norms]).clone()
                      for i in range(len(self.widths))]  # per layer (K, width)
        self.vars = [torch.stack([ms[i].running_var for ms in norms]).clone()
                     for i in range(len(self.widths))]
        self.steps = torch.stack([ms[0].num_batches_tracked for ms in norms]).to(
            self.means[0].dtype)[:, None]  # (K, 1): num_batches_tracked
        self.training: bool | torch.Tensor = True
        self.update = False

    @property
    def state(self) -> torch.Tensor:
        """(K, B): each layer's running mean and running variance, then the steps taken."""
        return torch.cat([t for pair in zip(self.means, self.vars, strict=True) for t in pair]
                         + [self.steps], 1)

    @state.setter
    def state(self, state: torch.Tensor) -> None:
        parts = state.split([w for w in self.widths for _ in (0, 1)] + [1], dim=1)
        self.means = [t.contiguous() for t in parts[0:-1:2]]
        self.vars = [t.contiguous() for t in parts[1:-1:2]]
        self.steps = parts[-1].contiguous()

    @contextmanager
    def mode(self, training: bool | list[bool], update: bool = False):
        """Inside, normalise in ``training`` mode (per model, or all), and with ``update``
        move the running statistics (a training step)."""
        saved = self.training, self.update
        if not isinstance(training, bool):
            training = (training[0] if len(set(training)) == 1 else
                        torch.tensor(training, device=self.steps.device))
        self.training, self.update = training, update
        try:
            yield
        finally:
            self.training, self.update = saved

    def __call__(self, i: int, z: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
        """Layer i's batch norm of z (K, width, n), affine weight and bias (K, width, 1)."""
        K, width, n = z.shape
        x = z.reshape(1, K * width, n)
        weight, bias = weight.reshape(K * width), bias.reshape(K * width)
        means, variances = self.means[i].view(-1), self.vars[i].view(-1)
        out = None
        if self.training is not False:
            if n == 1:  # as nn.BatchNorm1d: a batch of one row has no variance
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {torch.Size([1, width])}")
            moved = self.update and self.training is True
            out = F.batch_norm(x, means if moved else None, variances if moved else None,
                               weight, bias, True, self.momentum, self.eps)
        if self.training is not True:
            evaluated = F.batch_norm(x, means, variances, weight, bias, False, self.momentum,
                                     self.eps)
            out = evaluated if out is None else torch.where(
                self.training.repeat_interleave(width)[None, :, None], out, evaluated)
        return out.view(K, width, n)

    def stepped(self) -> None:
        """One training step more (``num_batches_tracked``)."""
        self.steps += 1

    def select(self, idx: torch.Tensor) -> None:
        self.means = [t[idx] for t in self.means]
        self.vars = [t[idx] for t in self.vars]
        self.steps = self.steps[idx]

    @torch.no_grad()
    def write(self, models: list[nn.Module]) -> None:
        """Model k's batch-norm buffers from row k of the running statistics."""
        for k, model in enumerate(models):
            for m, mean, var in zip(_batch_norms(model), self.means, self.vars, strict=True):
                m.running_mean.copy_(mean[k]), m.running_var.copy_(var[k])
                m.num_batches_tracked.fill_(int(self.steps[k]))


def _batch_norms(model: nn.Module) -> list[nn.BatchNorm1d]:
    """A model's batch-norm layers, input to head."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]


def forward(layout: Layout, flat: torch.Tensor | dict[str, torch.Tensor], X: torch.Tensor,
            act: StackedActivation, trace: list | None = None,
            norms: BatchNorms | None = None) -> torch.Tensor:
    """Logits (K, n_out, n) of all K models on X: (d, n) shared or (K, d, n) per model.

    ``flat``: the (K, P) parameters, or their (K, *shape) tensors by name, as
    ``layout.views`` gives them. With ``trace``, appends (pre-activation, activation,
    prelu's slope or None) of each hidden layer. ``norms``: the batch-norm layers' state
    (batch norm only).
    """
    p, h = flat if isinstance(flat, dict) else layout.views(flat), X
    for i in range(layout.depth):
        z = linear(p[f"blocks.{i}.linear.weight"], p[f"blocks.{i}.linear.bias"], h)
        if layout.norm == "layer":
            z = _layer_norm(z, p[f"blocks.{i}.norm.weight"], p[f"blocks.{i}.norm.bias"])
        elif layout.norm == "batch":
            z = norms(i, z, p[f"blocks.{i}.norm.weight"], p[f"blocks.{i}.norm.bias"])
        w = p.get(f"blocks.{i}.activation.weight")  # prelu's slope (K, 1, 1)
        a = act(z, w)  # (K, width, n)
        if trace is not None:
            trace.append((z, a, w))
        if layout.dropout and act.generators is not None:  # training
            a = dropout(a, layout.dropout, act.alpha_dropout, act.generators)[0]
        h = h + a if layout.residual[i] else a
    logits = linear(p["head.weight"], p["head.bias"], h)
    if layout.wide:
        logits = linear(p["wide.weight"], p["wide.bias"], wide_input(X, layout.cross)) + logits
    return logits


def wide_input(X: torch.Tensor, cross: bool) -> torch.Tensor:
    """Wide & Deep's wide inputs, feature-major: X (d, n) or (K, d, n), then with ``cross``
    the products X[i] X[j] for i < j, in the order of ``widedeep.model.cross_features``."""
    if not cross:
        return X
    d = X.shape[-2]
    i, j = torch.triu_indices(d, d, offset=1, device=X.device)
    return torch.cat([X, X[..., i, :] * X[..., j, :]], dim=-2)


def per_model_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(K,) mean loss of each model: logits (K, n_out, n), labels (n,) or (K, n)."""
    K, n_out, n = logits.shape
    if n_out == 1:  # two classes: BCE with logits on the single logit
        target = y.to(logits.dtype).expand(K, n)  # convert before expanding: no (K, n) copy
        return F.binary_cross_entropy_with_logits(logits[:, 0], target,
                                                  reduction="none").mean(1)
    return F.cross_entropy(logits, y.expand(K, n), reduction="none").mean(1)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # (K, 1)


class StackedOptimizer:
    """SGD (+momentum), Adam or AdamW on flat (K, P) params with per-model hyperparameters.

    Follows torch.optim's single-tensor update rules (betas 0.9/0.999, eps 1e-8, no
    dampening, no Nesterov). On the CPU the update is one compiled pass where the library
    builds (:class:`widedeep.fused.OptimizerStep`); else torch ops, whose step count is a
    tensor so that the step can be captured in a CUDA graph.
    """

    def __init__(self, configs: list[TrainConfig], flat: torch.Tensor):
        self.kind = configs[0].optimizer
        device = flat.device
        self.lr = _column([c.lr for c in configs], device)
        self.momentum = _column([c.momentum for c in configs], device)
        self.wd = _column([c.weight_decay for c in configs], device)
        self.use_wd = any(c.weight_decay for c in configs)
        self.buf = torch.zeros_like(flat)  # momentum / Adam first moment
        self.sq = torch.zeros_like(flat) if self.kind != "sgd" else None
        self.t = torch.zeros((), device=device)  # steps taken (the torch ops' count)
        self.steps = 0  # steps taken
        self._compiled = None  # OptimizerStep, False where torch ops update; None: not yet

    def select(self, idx: torch.Tensor) -> None:
        """Keep the state of the models at rows ``idx`` only."""
        for name in ("lr", "momentum", "wd", "buf", "sq"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])
        self._compiled = None  # bound to the old tensors

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        """Update ``flat`` in place from ``grad`` (both (K, P))."""
        self.steps += 1
        if self._compiled is None:  # NOTE: CUDA keeps torch ops: a graph can capture them
            from widedeep import fused

            self._compiled = not flat.is_cuda and fused.OptimizerStep.create(
                self.kind, flat, self.buf, self.sq, self.lr, self.momentum, self.wd) or False
        if self._compiled:
            self._compiled(flat, grad, self.steps)
            return
        self.t += 1
        if self.kind == "sgd":
            if self.use_wd:
                grad = grad + self.wd * flat
            # NOTE: torch starts the momentum buffer at the first gradient; with buf = 0,
            # buf * m + g is that gradient at step 1, and plain SGD (buf = g) when m = 0.
            self.buf.mul_(self.momentum).add_(grad)
            flat.addcmul_(self.lr, self.buf, value=-1)  # one pass, no (K, P) temporary
            return
        if self.kind == "adamw":
            flat.mul_(1 - self.lr * self.wd)
        elif self.use_wd:
            grad = grad + self.wd * flat
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self.buf.lerp_(grad, 1 - beta1)
        self.sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1 ** self.t)  # (K, 1)
        denom = (self.sq.sqrt() / torch.sqrt(1 - beta2 ** self.t)).add_(eps)
        flat.sub_(step_size * self.buf / denom)
