"""Batched engine, part 2b: the training step's gradients written out by hand.

For K lecture-size nets, autograd's bookkeeping costs more than the arithmetic: a graph per
step, and for every layer a slice of the flat ``(K, P)`` parameter tensor whose backward
allocates and zero-fills a ``(K, P)`` gradient. For the common case — an MLP without
normalisation whose activation acts element by element with a known derivative — this module
runs the forward pass, the loss and the backward pass as a fixed list of batched tensor
operations instead, calling the same ATen derivative kernels autograd would
(``sigmoid_backward``, ``threshold_backward``, ...). Anything else (layer norm, the softmax
family) keeps autograd; ``tests/test_batched_grad.py`` checks these gradients against
autograd's for every activation they cover.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from widedeep.batched import Layout, StackedActivation, dropout, linear, wide_input

aten = torch.ops.aten

# (grad wrt the activation's output, pre-activation z, activation a) -> grad wrt z
Derivative = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# SELU's constants, as torch.nn.functional.selu uses them.
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def derivative_of(module: nn.Module) -> Derivative | None:
    """The derivative of an activation module, or None when only autograd knows it."""
    m = module
    # NOTE: exact types, not isinstance: ReLU6 is a Hardtanh, and a subclass may change forward.
    table: dict[type, Derivative] = {
        nn.Sigmoid: lambda g, z, a: aten.sigmoid_backward(g, a),
        nn.Tanh: lambda g, z, a: aten.tanh_backward(g, a),
        nn.ReLU: lambda g, z, a: aten.threshold_backward(g, a, 0),
        nn.Threshold: lambda g, z, a: aten.threshold_backward(g, z, m.threshold),
        nn.LeakyReLU: lambda g, z, a: aten.leaky_relu_backward(g, z, m.negative_slope, False),
        nn.ELU: lambda g, z, a: aten.elu_backward(g, m.alpha, 1, 1, False, z),
        nn.CELU: lambda g, z, a: aten.elu_backward(g, m.alpha, 1, 1 / m.alpha, False, z),
        nn.SELU: lambda g, z, a: aten.elu_backward(g, _SELU_ALPHA, _SELU_SCALE, 1, False, z),
        nn.Hardtanh: lambda g, z, a: aten.hardtanh_backward(g, z, m.min_val, m.max_val),
        nn.ReLU6: lambda g, z, a: aten.hardtanh_backward(g, z, 0.0, 6.0),
        nn.Softplus: lambda g, z, a: aten.softplus_backward(g, z, m.beta, m.threshold),
        nn.Softshrink: lambda g, z, a: aten.softshrink_backward(g, z, m.lambd),
        nn.GELU: lambda g, z, a: aten.gelu_backward(g, z, approximate=m.approximate),
        nn.SiLU: lambda g, z, a: aten.silu_backward(g, z),
        nn.Mish: lambda g, z, a: aten.mish_backward(g, z),
        nn.Hardsigmoid: lambda g, z, a: aten.hardsigmoid_backward(g, z),
        nn.Hardswish: lambda g, z, a: aten.hardswish_backward(g, z),
        nn.Tanhshrink: lambda g, z, a: g * torch.tanh(z).square(),  # d(x - tanh x) = tanh^2
        nn.Softsign: lambda g, z, a: g / (1 + z.abs()).square(),
        nn.LogSigmoid: lambda g, z, a: g * torch.sigmoid(-z),  # d log sigmoid = sigmoid(-z)
    }
    return table.get(type(module))


# Activations with state per model. rrelu: the slopes drawn in the forward pass (K, width, n)
# are kept in place of the pre-activation; its derivative is the slope applied. prelu: its
# slope has a gradient too, so the step calls _prelu_backward itself.
_STATEFUL: dict[str, Derivative | None] = {
    "rrelu": lambda g, slopes, a: g * slopes,
    "prelu": None,
}


def _prelu_backward(g: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """prelu's gradients wrt z (K, width, n) and its slope w (K, 1, 1): g where z > 0, else
    w * g; and the sum of z * g where z <= 0, per model (K,).

    NOTE: written with threshold_backward, not where() or torch's prelu backward (with a
    slope per model, both cost ~30x more here); each entry is the same product either way.
    """
    above = aten.threshold_backward(g, z, 0)  # g where z > 0, else 0
    below = g - above  # g where z <= 0, else 0 (exact: g - g, g - 0)
    return torch.addcmul(above, w, below), (below * z).sum((1, 2))


# Activations whose derivative needs only their output: applied in place on the
# pre-activation, and differentiated in place on the incoming gradient, so a step allocates
# (and streams through) two tensors less per layer. (forward_, backward_(grad, output))
_IN_PLACE = {
    nn.Sigmoid: (torch.sigmoid_, lambda g, a: aten.sigmoid_backward.grad_input(g, a,
                                                                             grad_input=g)),
    nn.Tanh: (torch.tanh_, lambda g, a: aten.tanh_backward.grad_input(g, a, grad_input=g)),
    nn.ReLU: (torch.relu_, lambda g, a: aten.threshold_backward.grad_input(g, a, 0,
                                                                           grad_input=g)),
}


class ManualStep:
    """Per-model losses and gradients of K stacked MLPs, without autograd."""

    def __init__(self, layout: Layout, act: StackedActivation, derivative: Derivative):
        self.layout, self.act, self.derivative = layout, act, derivative
        self.forward_, self.backward_ = _IN_PLACE.get(type(act.module), (None, None))

    @classmethod
    def create(cls, layout: Layout, act: StackedActivation) -> ManualStep | None:
        """A step for ``layout``, or None when it needs autograd (layer norm, or an
        activation whose derivative is not written out here)."""
        name = act.spec.name
        derivative = _STATEFUL[name] if name in _STATEFUL else (
            derivative_of(act.module) if act.spec.elementwise else None)
        if layout.norm != "none" or (derivative is None and name not in _STATEFUL):
            return None
        return cls(layout, act, derivative)

    def __call__(self, flat: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) mean losses and (K, P) gradients, as ``autograd.grad(losses.sum(), flat)``.

        X is (d, n) shared by all models or (K, d, n); y is (n,) or (K, n).
        """
        p, layout = self.layout.views(flat), self.layout
        inputs, pres, outs = [], [], []  # per hidden layer: h (in, n), z and a (K, width, n)
        kept = []  # per hidden layer: dropout's gradient factor (K, width, n)
        h = X
        for i in range(layout.depth):
            z = linear(p[f"blocks.{i}.linear.weight"], p[f"blocks.{i}.linear.bias"], h)
            if self.forward_ is not None:  # z is this step's own fresh tensor
                a, z = self.forward_(z), None
            elif self.act.spec.name == "rrelu":  # keep the slopes drawn, not z
                a, z = self.act.rrelu(z)
            else:
                a = self.act(z, p.get(f"blocks.{i}.activation.weight"))
            inputs.append(h), pres.append(z), outs.append(a)
            if layout.dropout:
                a, factor = dropout(a, layout.dropout, self.act.alpha_dropout,
                                    self.act.generators)
                kept.append(factor)
            h = h + a if layout.residual[i] else a
        logits = linear(p["head.weight"], p["head.bias"], h)
        if layout.wide:
            wide = wide_input(X, layout.cross)
            logits = linear(p["wide.weight"], p["wide.bias"], wide) + logits
        loss, g = _loss_and_grad(logits, y)
        grads = {}
        if layout.wide:
            self._linear_back("wide", p, g, wide, grads, need_input=False)
        g = self._linear_back("head", p, g, h, grads, need_input=True)
        for i in reversed(range(layout.depth)):
            block_g = g * kept[i] if layout.dropout else g  # wrt the activation's output
            if self.backward_ is not None and not layout.residual[i]:
                dz = self.backward_(block_g, outs[i])  # this step's own, needed no more
            elif self.act.spec.name == "prelu":
                dz, grads[f"blocks.{i}.activation.weight"] = _prelu_backward(
                    block_g, pres[i], p[f"blocks.{i}.activation.weight"])
            else:
                dz = self.derivative(block_g, pres[i], outs[i])
            dh = self._linear_back(f"blocks.{i}.linear", p, dz, inputs[i], grads,
                                   need_input=i > 0)
            if i > 0:
                g = dh + g if layout.residual[i] else dh
        return loss, torch.cat([grads[name].reshape(flat.shape[0], -1)
                                for name in layout.names], 1)

    @staticmethod
    def _linear_back(name: str, p: dict, g: torch.Tensor, h: torch.Tensor, grads: dict,
                     *, need_input: bool) -> torch.Tensor | None:
        """Fill grads of ``name``'s weight and bias from g (K, out, n) and its input h;
        return the gradient wrt h (K, in, n) when ``need_input``."""
        K, n_out, n = g.shape
        grads[f"{name}.bias"] = g.sum(2)
        if h.dim() == 2:  # the shared data (in, n): one GEMM for all K
            grads[f"{name}.weight"] = torch.mm(g.reshape(K * n_out, n), h.t())
        else:
            grads[f"{name}.weight"] = torch.bmm(g, h.transpose(1, 2))
        return torch.bmm(p[f"{name}.weight"].transpose(1, 2), g) if need_input else None


def _loss_and_grad(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K,) mean losses and their gradient wrt logits (K, n_out, n): BCE with logits on one
    logit, cross-entropy on several (the plain loop's criteria)."""
    K, n_out, n = logits.shape
    if n_out == 1:
        target = y.to(logits.dtype).expand(K, n).unsqueeze(1)  # (K, 1, n)
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
        return loss, (torch.sigmoid(logits) - target).div_(n)
    labels = y.expand(K, n).unsqueeze(1)  # (K, 1, n)
    logp = torch.log_softmax(logits, 1)
    loss = -logp.gather(1, labels).mean((1, 2))
    grad = logp.exp_()  # softmax - one-hot
    grad.scatter_add_(1, labels, torch.full(labels.shape, -1.0, device=grad.device))
    return loss, grad.div_(n)
