"""Batched engine, part 2c: the step of K small MLPs as one compiled CPU call.

Up to ``MAX_WIDTH`` units per layer, what a step in torch ops costs is mostly memory traffic:
each elementwise op streams all K models' (width, n) activations through memory once (a
K = 64 stack of the lecture net is ~2 MB per tensor, more than L2), and a step is ~40 such
ops. ``_fused.c`` runs the forward pass, the loss and the backward pass one model
at a time with every intermediate in a cache-sized scratch buffer (measured in
``bench/test_batched.py``; the README's batched-engine section has the figures).

It is compiled on first use with the system C compiler (``$CC``, else ``cc``) for this CPU
and cached under ``widedeep.data.cache_dir() / "kernels"``, keyed by source, compiler and
CPU. Without a working compiler, or with ``WIDEDEEP_FUSED=0``, the engine uses its torch step
(:mod:`widedeep.batched_grad`) instead; :func:`status` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from widedeep.activations import get_activation, list_activations
from widedeep.batched import Layout, StackedActivation, dropout_masks, mask_values

SOURCE = Path(__file__).with_name("_fused.c")
RRELU = -1  # _fused.c's ACT_NONE: rrelu's slopes come with the call (widedeep_mlp_step)
# The activation codes of _fused.c (ACT_*), and the parameters each passes to it.
# NOTE: exact types, not isinstance: ReLU6 is a Hardtanh, and a subclass may change forward.
_CODES: dict[type, Callable[[nn.Module], tuple[int, float, float] | None]] = {
    nn.Sigmoid: lambda m: (0, 0.0, 0.0),
    nn.Tanh: lambda m: (1, 0.0, 0.0),
    nn.ReLU: lambda m: (2, 0.0, 0.0),
    nn.LeakyReLU: lambda m: (3, m.negative_slope, 0.0),
    nn.ELU: lambda m: (4, m.alpha, 0.0),
    nn.SELU: lambda m: (5, 0.0, 0.0),
    nn.CELU: lambda m: (6, m.alpha, 0.0),
    nn.Hardtanh: lambda m: (7, m.min_val, m.max_val),
    nn.ReLU6: lambda m: (7, 0.0, 6.0),
    nn.LogSigmoid: lambda m: (8, 0.0, 0.0),
    nn.Softplus: lambda m: (9, m.beta, m.threshold),
    nn.SiLU: lambda m: (10, 0.0, 0.0),
    nn.GELU: lambda m: (11, 0.0, 0.0) if m.approximate == "none" else None,
    nn.Mish: lambda m: (12, 0.0, 0.0),
    nn.Hardswish: lambda m: (13, 0.0, 0.0),
    nn.Hardsigmoid: lambda m: (14, 0.0, 0.0),
    nn.Softshrink: lambda m: (15, m.lambd, 0.0),
    nn.Tanhshrink: lambda m: (16, 0.0, 0.0),
    nn.Softsign: lambda m: (17, 0.0, 0.0),
    nn.Threshold: lambda m: (18, m.threshold, m.value),
    # one learnable slope per layer (a parameter: the step reads it from the flat row)
    nn.PReLU: lambda m: (19, 0.0, 0.0) if m.num_parameters == 1 else None,
    # over the features of a hidden layer's (batch, width) output only
    nn.Softmax: lambda m: (20, 0.0, 0.0) if m.dim in (-1, 1) else None,
    nn.Softmin: lambda m: (21, 0.0, 0.0) if m.dim in (-1, 1) else None,
    nn.LogSoftmax: lambda m: (22, 0.0, 0.0) if m.dim in (-1, 1) else None,
    # the identity times slopes drawn in the step from each model's stream (RRELU)
    nn.RReLU: lambda m: (RRELU, m.lower, m.upper),
}


def _code_of(module: nn.Module) -> tuple[int, float, float] | None:
    """(code, p0, p1) of an activation module for _fused.c, or None when it has none."""
    code = _CODES.get(type(module))
    return code(module) if code is not None else None


ACTIVATIONS = sorted(name for name in list_activations()
                     if _code_of(get_activation(name).create()) is not None)
# Widest layer the fused step takes (the search's widest). At 256 torch's GEMMs have caught
# up with it, but not the step around them (dev VM, one thread, Adam, ms per step, fused vs
# the torch-ops step: 8 nets of 4 x 256 tanh units, 607 rows, 81 vs 90; 5 nets, mini-batches
# of 128, 13.2 vs 13.2; of 8 x 256 ReLU units, mini-batches of 32, 16.1 vs 18.9), and with
# layer norm the step it replaces is autograd's (2 nets of 4 x 256, 607 rows: 24.5 vs 44.0).
MAX_WIDTH = 256
FLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno", "-pthread")
ARCH_FLAGS = (("-march=native",), ())  # tried in turn: not every compiler knows native
STALE_DAYS = 30  # builds of other versions older than this are removed after a build

_lib: ctypes.CDLL | None = None
_status: str | None = None  # None until first asked for


def status() -> str | None:
    """"compiled", "off: <why>" or "unavailable: <why>"; None if nothing asked for it yet."""
    return _status


def lanes() -> int | None:
    """Floats per vector of the loaded build: 16 where the compiler targets AVX-512, else 8;
    None without one."""
    return _lib.widedeep_lanes() if _lib is not None else None


def library() -> ctypes.CDLL | None:
    """The compiled step, building it on first use; None when it cannot be had."""
    global _lib, _status
    if _status is None:
        if os.environ.get("WIDEDEEP_FUSED", "1").strip() in ("0", "off", "false", "no"):
            _status = "off: WIDEDEEP_FUSED=0"
        else:
            try:
                _lib = _load(_build())
                _status = "compiled"
            except (OSError, RuntimeError) as e:
                _status = f"unavailable: {e}"
    return _lib


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return platform.machine() + "\n" + "\n".join(sorted(set(wanted)))


def _build() -> Path:
    from widedeep.data import cache_dir

    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found; set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    folder = cache_dir() / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    errors = []
    for arch in ARCH_FLAGS:
        flags = (*FLAGS, *arch)
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                         _cpu_key().encode()])).hexdigest()[:16]
        target = folder / f"fused-{key}.so"
        if target.exists():
            try:
                os.utime(target)  # in use: see _prune
            except OSError:
                pass
            return target
        if sys.stderr.isatty():  # a pause of seconds, once per machine: say what it is
            print("widedeep: building the compiled training step for this CPU (once)...",
                  file=sys.stderr, flush=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        out = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                             text=True)
        if out.returncode == 0:
            os.replace(tmp, target)  # atomic: parallel workers may build it at once
            _prune(folder, keep=target)
            return target
        os.unlink(tmp)
        errors.append((out.stderr.strip().splitlines() or ["failed"])[0])
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1]}")


def _prune(folder: Path, keep: Path) -> None:
    """Remove builds (and leftovers of failed ones) neither made nor loaded for STALE_DAYS:
    each source version and compiler makes a build of its own, and nothing else would remove
    them. A process that loaded one keeps it mapped; one that wants it again rebuilds it."""
    cutoff = time.time() - STALE_DAYS * 86400
    for path in [*folder.glob("fused-*.so"), *folder.glob("tmp*.so")]:
        try:
            if path != keep and path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:  # another process removed it first
            pass


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    f = lib.widedeep_mlp_step
    c_int, ptr, c_long = ctypes.c_int, ctypes.c_void_p, ctypes.c_long
    f.argtypes = [c_int, c_int, c_int, c_int, c_int, ptr, c_int,  # threads K d n depth widths n_out
                  c_int, ptr,  # act act_params
                  ptr, c_long, ptr, ptr,  # flat P w_off b_off
                  ptr, c_int, ptr, c_int,  # X per-model y per-model
                  ptr, ptr, c_int, c_long, c_long,  # s_off res wide wide_w wide_b
                  ptr, ptr, ptr, ptr, ptr, ptr]  # noise shift ln_off rr_states loss grad
    f.restype = c_int
    f = lib.widedeep_rrelu_slopes
    f.argtypes = [ptr, ptr, c_int, c_int, ctypes.c_float, ctypes.c_float, ptr]
    f.restype = c_int
    f = lib.widedeep_opt_step
    f.argtypes = [c_int, c_int, c_long, ptr, ptr, ptr, ptr,  # kind K P flat grad buf sq
                  ptr, ptr, ptr, ctypes.c_double]  # lr momentum wd t
    f.restype = None
    f = lib.widedeep_dropout_masks
    c_float = ctypes.c_float
    f.argtypes = [c_int, ptr, c_int, ptr, c_int,  # K states depth widths n
                  ctypes.c_double, c_float, c_float, c_float, c_float,  # keep on off shifts
                  ptr, ptr]  # noise shift
    f.restype = c_int
    lib.widedeep_lanes.argtypes, lib.widedeep_lanes.restype = [], c_int
    return lib


STATE_BYTES = 5056  # torch.Generator().get_state(): the layout _fused.c reads
_masks_checked: dict[int, bool] = {}  # id of a loaded library: its masks are torch's
_slopes_checked: dict[int, bool] = {}  # id of a loaded library: its rrelu slopes are torch's


def draw_masks(lib: ctypes.CDLL, widths: list[int], n: int, p: float, alpha: bool,
               generators: list[torch.Generator | None],
               out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Dropout's factors and (alpha dropout) shifts of hidden layers of ``widths`` on
    ``n`` rows, (K, hidden units, n) each, layer after layer from each model's generator
    (advanced), as :func:`widedeep.batched.dropout_masks` draws them, by the compiled draw
    (``widedeep_dropout_masks``); a model without a generator (evaluated) drops nothing, as
    there. ``out``: tensors of the results' shapes to write them into (a new allocation of
    a few MB each step costs page faults). None where the compiled draw cannot be used: a
    torch whose generator state or draws are not the ones it knows (checked once)."""
    if not _masks_are_torchs(lib):
        return None
    return _draw_in_c(lib, widths, n, p, alpha, generators, out)


def _draw_in_c(lib: ctypes.CDLL, widths: list[int], n: int, p: float, alpha: bool,
               generators: list[torch.Generator | None],
               out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    states = [g.get_state() if g is not None else None for g in generators]
    pointers = (ctypes.c_void_p * len(states))(
        *[s.data_ptr() if s is not None else None for s in states])
    K, hidden = len(generators), sum(widths)
    shape = (K, hidden, n)
    if (out is None or out[0].shape != shape or not out[0].is_contiguous()
            or (out[1] is None) == alpha or (alpha and not out[1].is_contiguous())):
        out = torch.empty(shape), torch.empty(shape) if alpha else None
    noise, shift = out
    code = lib.widedeep_dropout_masks(K, pointers, len(widths),
                                      _c_array(ctypes.c_int, widths), n, 1 - p,
                                      *_mask_values(p, alpha), noise.data_ptr(),
                                      shift.data_ptr() if shift is not None else None)
    if code != 0:
        raise MemoryError("the compiled draw could not allocate its scratch memory")
    for g, state in zip(generators, states, strict=True):
        if g is not None:
            g.set_state(state)
    return noise, shift


@functools.lru_cache(maxsize=64)
def _mask_values(p: float, alpha: bool) -> tuple[float, float, float, float]:
    """A kept and a dropped unit's factor, then their shifts (0 without alpha dropout), as
    torch's dropout computes them."""
    factor, shift = mask_values(torch.tensor([1.0, 0.0]), p, alpha)
    return (*factor.tolist(), *(shift.tolist() if shift is not None else (0.0, 0.0)))


def _masks_are_torchs(lib: ctypes.CDLL) -> bool:
    """Whether the compiled draw gives torch's masks and leaves torch's states, on layers
    that cross mt19937's refills, a fresh and a used generator, and a model without one (the
    state's layout is torch's own, not a public interface): once per loaded library."""
    if id(lib) not in _masks_checked:
        ok = torch.Generator().get_state().numel() == STATE_BYTES
        for alpha, p, used in ((False, 0.2, 0), (True, 0.35, 1001)):
            if not ok:
                break
            ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            for g in (ours, theirs):
                torch.empty(used).uniform_(generator=g)
            got = _draw_in_c(lib, [3, 250, 17], 9, p, alpha, [ours, None])
            want = [dropout_masks(w, 9, p, alpha, [theirs, None], torch.device("cpu"))
                    for w in (3, 250, 17)]
            ok = (torch.equal(got[0], torch.cat([m[0] for m in want], 1))
                  and (not alpha or torch.equal(got[1], torch.cat([m[1] for m in want], 1)))
                  and torch.equal(ours.get_state(), theirs.get_state()))
        _masks_checked[id(lib)] = ok
    return _masks_checked[id(lib)]


def rrelu_slopes(lib: ctypes.CDLL, z: torch.Tensor, lower: float, upper: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """The slopes the compiled step gives rrelu's (n, width) pre-activations ``z`` in
    training, drawn from ``generator`` (advanced), as torch's ``rrelu_with_noise`` draws its
    noise; None: evaluated, the mean slope below zero."""
    z = z.to(torch.float32).contiguous()
    state = generator.get_state() if generator is not None else None
    out = torch.empty_like(z)
    code = lib.widedeep_rrelu_slopes(state.data_ptr() if state is not None else None,
                                     z.data_ptr(), z.shape[1], z.shape[0], lower, upper,
                                     out.data_ptr())
    if code != 0:
        raise MemoryError("the compiled draw could not allocate its scratch memory")
    if generator is not None:
        generator.set_state(state)
    return out


def _slopes_are_torchs(lib: ctypes.CDLL) -> bool:
    """Whether the compiled step draws rrelu's slopes as torch's CPU ``rrelu_with_noise``
    does and leaves torch's states, on a layer whose draws cross mt19937's refills, with
    zeros and NaN, from a fresh and a used generator; and its evaluated slopes are
    ``F.rrelu``'s: once per loaded library."""
    if id(lib) not in _slopes_checked:
        module = get_activation("rrelu").create()
        lower, upper = module.lower, module.upper
        z = torch.randn(37, 41, generator=torch.Generator().manual_seed(3))
        z[0, :3] = torch.tensor([0.0, -0.0, float("nan")])
        ok = torch.Generator().get_state().numel() == STATE_BYTES
        for used in (0, 1001):
            if not ok:
                break
            ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
            for g in (ours, theirs):
                torch.empty(used).uniform_(generator=g)
            noise = torch.empty_like(z)
            torch._C._nn.rrelu_with_noise(z, noise, lower, upper, True, theirs)
            ok = (torch.equal(rrelu_slopes(lib, z, lower, upper, ours), noise)
                  and torch.equal(ours.get_state(), theirs.get_state()))
        finite = z[1:]  # evaluated: z times the mean slope below zero, as torch
        ok = ok and torch.equal(finite * rrelu_slopes(lib, finite, lower, upper, None),
                                nn.functional.rrelu(finite, lower, upper, training=False))
        _slopes_checked[id(lib)] = ok
    return _slopes_checked[id(lib)]


class OptimizerStep:
    """:class:`widedeep.batched.StackedOptimizer`'s update in one compiled pass, bound to
    its state: in place on the (K, P) parameters ``flat`` and moments ``buf`` and ``sq``,
    with per-model (K, 1) ``lr``, ``momentum`` and ``wd``. Bound once: a step passes only
    the gradient and the step number (a call costs ~5 us; torch's ~15 ops cost ~100)."""

    CODES = {"sgd": 0, "adam": 1, "adamw": 2}  # _fused.c's OPT_*

    def __init__(self, fn, kind: str, state: tuple[torch.Tensor, ...]):
        self.fn, self.state = fn, state  # kept: the call reads them through raw pointers
        flat, buf, sq, lr, momentum, wd = state
        self.shape, self.flat_ptr = flat.shape, flat.data_ptr()
        # the call's arguments before and after the gradient's pointer
        self.head = (self.CODES[kind], *flat.shape, self.flat_ptr)
        self.tail = (buf.data_ptr(), sq.data_ptr() if sq is not None else None,
                     lr.data_ptr(), momentum.data_ptr(), wd.data_ptr())

    @classmethod
    def create(cls, kind: str, flat: torch.Tensor, buf: torch.Tensor,
               sq: torch.Tensor | None, lr: torch.Tensor, momentum: torch.Tensor,
               wd: torch.Tensor) -> OptimizerStep | None:
        """The bound step, or None where the library is lacking or a tensor is not
        float32, contiguous and on the CPU."""
        state = (flat, buf, sq, lr, momentum, wd)
        lib = library()
        if lib is None or any(x is not None and (x.device.type != "cpu"
                                                 or x.dtype != torch.float32
                                                 or not x.is_contiguous()) for x in state):
            return None
        return cls(lib.widedeep_opt_step, kind, state)

    def __call__(self, flat: torch.Tensor, grad: torch.Tensor, t: int) -> None:
        """Step ``t`` (from 1) from ``grad`` (K, P); ``flat`` must be the bound one."""
        if flat.data_ptr() != self.flat_ptr or grad.shape != self.shape:
            raise ValueError("the optimizer step is bound to other parameters")
        if grad.dtype != torch.float32 or not grad.is_contiguous():
            grad = grad.to(torch.float32).contiguous()
        self.fn(*self.head, grad.data_ptr(), *self.tail, float(t))


def _layers(layout: Layout) -> list[str]:
    """The Linear layers, input to head."""
    return [f"blocks.{i}.linear" for i in range(layout.depth)] + ["head"]


def _c_array(ctype, values: list):
    """values as a C array the step reads through a pointer; None (NULL) when empty."""
    return (ctype * len(values))(*values) if values else None


def _slopes(layout: Layout) -> list[str]:
    """prelu's slopes, one per hidden layer (none for other activations)."""
    if layout.activation != "prelu":
        return []
    return [f"blocks.{i}.activation.weight" for i in range(layout.depth)]


def _norms(layout: Layout) -> list[str]:
    """Layer norm's weight and bias of each hidden layer, in turn (none without it)."""
    if layout.norm != "layer":
        return []
    return [f"blocks.{i}.norm.{p}" for i in range(layout.depth) for p in ("weight", "bias")]


class FusedStep:
    """Per-model losses and gradients of K stacked MLPs, from the compiled step."""

    def __init__(self, layout: Layout, lib: ctypes.CDLL, act: StackedActivation):
        self.lib, self.fn = lib, lib.widedeep_mlp_step
        self._masks: tuple[torch.Tensor, torch.Tensor | None] | None = None  # see _dropout_masks
        # dropout: its masks come from act's per-model streams, drawn before the call
        self.stacked_act, self.dropout = act, layout.dropout
        module = get_activation(layout.activation).create()
        code, p0, p1 = _code_of(module)
        self.act, self._act_params = code, (ctypes.c_float * 2)(p0, p1)
        self.rrelu = code == RRELU  # its slopes drawn in the call, from act's streams
        shapes, offsets = dict(zip(layout.names, layout.shapes, strict=True)), layout.offsets()
        layers = _layers(layout)
        self.depth, self.n_params = layout.depth, layout.n_params
        self.d = shapes[f"{layers[0]}.weight"][1]
        self.n_out = shapes["head.weight"][0]
        # Kept as attributes: the C side reads them through raw pointers.
        self._hidden = [shapes[f"{name}.weight"][0] for name in layers[:-1]]
        self._widths = (ctypes.c_int * max(1, layout.depth))(*self._hidden)
        self._w_off = (ctypes.c_long * len(layers))(*[offsets[f"{n}.weight"] for n in layers])
        self._b_off = (ctypes.c_long * len(layers))(*[offsets[f"{n}.bias"] for n in layers])
        # prelu's slope and layer norm's weight and bias per hidden layer; residual flags
        self._s_off = _c_array(ctypes.c_long, [offsets[n] for n in _slopes(layout)])
        self._ln_off = _c_array(ctypes.c_long, [offsets[n] for n in _norms(layout)])
        self._res = _c_array(ctypes.c_int, list(layout.residual) if any(layout.residual) else [])
        # Wide & Deep: 1, a wide part on the features; 2, on them and their products
        self._wide = (2 if layout.cross else 1) if layout.wide else 0
        self._wide_off = (offsets["wide.weight"], offsets["wide.bias"]) if layout.wide else (0, 0)

    @classmethod
    def create(cls, layout: Layout, device: torch.device, models: int,
               act: StackedActivation) -> FusedStep | None:
        """A step for ``models`` stacked nets of ``layout`` on ``device`` whose activation
        (and the streams of its dropout masks) is ``act``, or None when the fused step does
        not apply (not CPU, fewer models than torch's threads, batch norm, an activation it
        lacks, too wide, rrelu with dropout, whose draws interleave layer by layer) or is not
        available (see :func:`status`; rrelu: where its draws are not torch's)."""
        widths = [shape[0] for name, shape in zip(layout.names, layout.shapes, strict=True)
                  if name.endswith("linear.weight")]
        known = {f"{n}.{p}" for n in _layers(layout) for p in ("weight", "bias")}
        known |= {*_slopes(layout), *_norms(layout)}
        known |= {"wide.weight", "wide.bias"} if layout.wide else set()
        if (device.type != "cpu" or set(layout.names) != known  # batch norm: running stats
                or layout.activation not in ACTIVATIONS or max(widths, default=0) > MAX_WIDTH
                or (layout.activation == "rrelu" and layout.dropout)):
            return None
        # NOTE: the kernel splits the models between torch's threads (as many as the run gave
        # this stack: one for small steps, see widedeep.run.SMALL_STEP_FLOPS); a model is never
        # split, so where there are fewer models than threads, torch's threaded step keeps it.
        if models < torch.get_num_threads():
            return None
        lib = library()
        if lib is None or (layout.activation == "rrelu" and not _slopes_are_torchs(lib)):
            return None
        return cls(layout, lib, act)

    def __call__(self, flat: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K,) mean losses and (K, P) gradients, as ``autograd.grad(losses.sum(), flat)``.

        X is (d, n) shared by all models or (K, d, n); y is (n,) or (K, n) labels.
        """
        # NOTE: a mini-batch step of a few models costs less than this wrapper's Python: check
        # and convert only what needs it, and read raw memory (no detach: flat's autograd
        # state does not matter to a pointer).
        if not flat.is_contiguous():
            flat = flat.contiguous()
        if X.dtype != torch.float32 or not X.is_contiguous():
            X = X.to(torch.float32).contiguous()
        if y.dtype != torch.int64 or not y.is_contiguous():
            y = y.to(torch.int64).contiguous()
        K = flat.shape[0]
        noise, shift = self._dropout_masks(X.shape[-1])
        states = self._rrelu_states(K)
        loss, grad = torch.empty(K), torch.empty(K, self.n_params)
        code = self.fn(torch.get_num_threads(), K, self.d, X.shape[-1], self.depth, self._widths,
                       self.n_out, self.act, self._act_params, flat.data_ptr(), self.n_params,
                       self._w_off, self._b_off, X.data_ptr(), X.dim() == 3, y.data_ptr(),
                       y.dim() == 2, self._s_off, self._res, self._wide, *self._wide_off,
                       noise.data_ptr() if noise is not None else None,
                       shift.data_ptr() if shift is not None else None, self._ln_off,
                       None if states is None else (ctypes.c_void_p * K)(
                           *[s.data_ptr() if s is not None else None for s in states]),
                       loss.data_ptr(), grad.data_ptr())
        if code != 0:
            raise MemoryError("the fused step could not allocate its scratch memory")
        if states is not None and self.stacked_act.generators is not None:
            # the streams go on where the call's draws left them
            for g, state in zip(self.stacked_act.generators, states, strict=True):
                if g is not None:
                    g.set_state(state)
        return loss, grad

    def _rrelu_states(self, K: int) -> list[torch.Tensor | None] | None:
        """rrelu: each model's stream's state, for the call to draw its slopes from (None
        where the model is evaluated: no streams, or None for it); None for the others."""
        if not self.rrelu:
            return None
        generators = self.stacked_act.generators
        if generators is None:
            return [None] * K
        return [g.get_state() if g is not None else None for g in generators]

    def _dropout_masks(self, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dropout's factors and (alpha dropout) shifts of every hidden layer, (K, hidden
        units, n) each, drawn layer by layer from each model's stream as the torch-ops step
        draws them; None where there is no dropout, or no streams (evaluation)."""
        generators = self.stacked_act.generators
        if not self.dropout or generators is None:
            return None, None
        alpha = self.stacked_act.alpha_dropout
        drawn = draw_masks(self.lib, self._hidden, n, self.dropout, alpha, generators,
                           self._masks)
        if drawn is not None:
            self._masks = drawn  # the next step's draws go there (the call only reads them)
            return drawn
        masks = [dropout_masks(w, n, self.dropout, alpha, generators, torch.device("cpu"))
                 for w in self._hidden]
        noise = torch.cat([m[0] for m in masks], 1)
        return noise, torch.cat([m[1] for m in masks], 1) if alpha else None
