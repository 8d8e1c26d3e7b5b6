"""Stacked-ensemble training of same-architecture variants (one home; localization and DeNetDM use it).

A *variant* is one training run of the same architecture from the same initialization and
the same batches, differing only per block: which of two batches (clean or skewed) block l
learns from, and a learning-rate factor for block l. `train_variants` trains V variants

- stacked (the fast path): the parameters and buffers of all variants are stacked along a
  leading dimension (torch.func.stack_module_state layout) and one vmap(functional_call)
  computes every variant's forward and backward per step (vmap turns a batched conv into a
  grouped conv); BatchNorm buffers are stacked too, so running statistics stay per variant
  (never `replace_all_batch_norm_modules_`: it drops the running statistics);
- one after another (`stacked=False`): plain modules, one torch.optim.SGD per variant, the
  reference in tests and the baseline of bench/localization.py.

Both give the same result to float tolerance (tests/test_ensemble.py).

Which batch trains which block. Per step and variant, with m_l = skewed[v, l]:
    loss = CE(f(x_skewed; p_l * m_l + sg(p_l) * (1 - m_l))) + CE(f(x_clean; p_l * (1 - m_l) + sg(p_l) * m_l))
(sg = stop-gradient), so the gradient of block l comes from exactly one of the two batches
while the forward values are the same as the plain model's in both passes.

BatchNorm running statistics: both passes run the model in train mode and would each update
them; we keep, for every block, the statistics of the pass whose batch trains that block
(the skewed pass for m_l = 1, the clean pass otherwise). Why: a block's weights are fitted
to activations normalized by the statistics of its training batches, and at evaluation the
running statistics stand in for those; taking them from the other pass would normalize with
statistics the block never trained under. A buffer belongs to the block of the parameter
that shares the longest dotted name prefix with it (its own BatchNorm's weight when affine).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from shortcut_fast.models import model_blocks
from shortcut_fast.report import Progress
from shortcut_fast.run_folder import Store
from shortcut_fast.validate import check_int

HEAD = "head"  # name of the group of parameters that lie in no block
STATE_FILE = "ensemble.pt"


# ---------------------------------------------------------------------------------------
# Variants and blocks


@dataclass
class Variants:
    """V training variants of one architecture over L blocks (block = one parameter group of
    `block_parameter_groups`, the last being the head).

    names: one per variant, e.g. ["clean", "skew", "skew@layer1", "clean@layer1", ...].
    skewed: (V, L) bool: block l of variant v gets the gradient of the loss on the skewed batch
        (else the clean batch's).
    lr_scale: (V, L) float: per-block learning-rate factor (1.0 normal, 0.1, 0.0 = frozen).
    """

    names: list[str]
    skewed: torch.Tensor
    lr_scale: torch.Tensor

    def __post_init__(self):
        self.names = list(self.names)
        self.skewed = torch.as_tensor(self.skewed).to(torch.bool).cpu()
        self.lr_scale = torch.as_tensor(self.lr_scale, dtype=torch.float64).cpu()
        if self.skewed.dim() != 2 or self.skewed.shape[0] < 1 or self.skewed.shape[1] < 1:
            raise ValueError(f"skewed must be a (V, L) bool tensor with V, L >= 1, got shape {tuple(self.skewed.shape)}")
        if self.lr_scale.shape != self.skewed.shape:
            raise ValueError(f"lr_scale must have the shape of skewed {tuple(self.skewed.shape)}, "
                             f"got {tuple(self.lr_scale.shape)}")
        if not bool(torch.isfinite(self.lr_scale).all()) or bool((self.lr_scale < 0).any()):
            raise ValueError("lr_scale must hold finite factors >= 0 (0 freezes a block)")
        if len(self.names) != self.skewed.shape[0]:
            raise ValueError(f"names must give one name per variant ({self.skewed.shape[0]}), got {len(self.names)}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"names must be unique, got {self.names}")

    @property
    def num_variants(self) -> int:
        return self.skewed.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.skewed.shape[1]

    def subset(self, indices: Sequence[int]) -> "Variants":
        idx = list(indices)
        return Variants([self.names[i] for i in idx], self.skewed[idx], self.lr_scale[idx])


def block_parameter_groups(model: nn.Module, blocks: Sequence[str]) -> list[list[str]]:
    """Parameter names of each block, in the order of `blocks`, then one more group ("head",
    possibly empty) of every parameter in no block (head, ViT position embeddings, ...), so
    L = len(blocks) + 1. A block is a qualified submodule name: one of `models.model_blocks`
    or any other submodule (e.g. a stage "layer1" for a coarser granularity)."""
    blocks = list(blocks)
    if not blocks:
        raise ValueError("blocks must name at least one block")
    valid = model_blocks(model)
    modules = dict(model.named_modules())
    for b in blocks:
        if not isinstance(b, str) or not b or b not in modules:
            raise ValueError(f"blocks: unknown block {b!r}; valid blocks of this model: {', '.join(valid)} "
                             f"(or another of its submodules)")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"blocks must be unique, got {blocks}")
    for a in blocks:
        for b in blocks:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"blocks: {b!r} lies inside {a!r}; a parameter must belong to one block")
    groups: list[list[str]] = [[] for _ in blocks]
    rest: list[str] = []
    for name, _ in model.named_parameters():
        owner = next((i for i, b in enumerate(blocks) if name.startswith(b + ".")), None)
        (rest if owner is None else groups[owner]).append(name)
    for b, g in zip(blocks, groups):
        if not g:
            raise ValueError(f"blocks: block {b!r} has no parameters; choose from {', '.join(valid)}")
    return groups + [rest]


def _buffer_groups(model: nn.Module, groups: list[list[str]]) -> dict[str, int]:
    """Group index of every buffer: that of the parameter sharing the longest dotted prefix
    with it (the head group when none shares any)."""
    owners = {}
    for name, _ in model.named_buffers():
        parts = name.split(".")[:-1]
        best, best_len = len(groups) - 1, 0
        for gi, group in enumerate(groups):
            for p in group:
                q = p.split(".")[:-1]
                k = 0
                while k < min(len(parts), len(q)) and parts[k] == q[k]:
                    k += 1
                if k > best_len:
                    best, best_len = gi, k
        owners[name] = best
    return owners


def _check_groups(model: nn.Module, variants: Variants, groups: list[list[str]]) -> dict[str, int]:
    """Group index of every parameter, after checking `groups` against the model and variants."""
    if len(groups) != variants.num_blocks:
        raise ValueError(f"groups: {len(groups)} parameter groups, but variants have {variants.num_blocks} "
                         f"blocks (columns of skewed); use block_parameter_groups(model, blocks)")
    names = [n for n, _ in model.named_parameters()]
    known = set(names)
    owner: dict[str, int] = {}
    for gi, group in enumerate(groups):
        for p in group:
            if p not in known:
                raise ValueError(f"groups: {p!r} is not a parameter of the model")
            if p in owner:
                raise ValueError(f"groups: parameter {p!r} is in groups {owner[p]} and {gi}")
            owner[p] = gi
    missing = [n for n in names if n not in owner]
    if missing:
        raise ValueError(f"groups: parameters in no group: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return owner


# ---------------------------------------------------------------------------------------
# Training


def _check_batch(batch, epoch: int):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 3):
        raise ValueError(f"batches({epoch}) must yield (x_clean, x_skewed, y) tuples, got {type(batch).__name__}")
    x_clean, x_skewed, y = batch
    if x_clean.shape != x_skewed.shape:
        raise ValueError(f"batches({epoch}): x_clean {tuple(x_clean.shape)} and x_skewed {tuple(x_skewed.shape)} "
                         f"must have the same shape (the same images, with and without the shortcut)")
    if y.dim() != 1 or y.shape[0] != x_clean.shape[0]:
        raise ValueError(f"batches({epoch}): y must have shape ({x_clean.shape[0]},), got {tuple(y.shape)}")
    return x_clean, x_skewed, y


def _unstack(model: nn.Module, params: dict, buffers: dict, v: int) -> dict[str, torch.Tensor]:
    """Variant v's state_dict (the model's keys, tied names included) from stacked tensors."""
    canonical = {id(t): n for n, t in model.named_parameters()}  # a tied tensor has one stacked name
    canonical.update({id(t): n for n, t in model.named_buffers()})
    out = {}
    for key, t in model.state_dict(keep_vars=True).items():
        name = canonical[id(t)]
        out[key] = (params[name] if name in params else buffers[name])[v].detach().clone()
    return out


def _check_args(epochs, lr, momentum, weight_decay):
    check_int("epochs", epochs)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite float > 0, got {lr!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"momentum must be a float in [0, 1), got {momentum!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {weight_decay!r}")


def train_variants(model: nn.Module, variants: Variants, groups: list[list[str]],
                   batches: Callable[[int], Iterable], *, epochs: int, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4, stacked: bool = True, store: Store | None = None,
                   progress: bool = True, on_epoch_end=None) -> list[dict]:
    """Train V copies of `model` (all from its current weights) and return one state_dict per variant.

    batches(epoch) yields (x_clean, x_skewed, y) tensors on the model's device; it must give the
    same batches every time it is called with the same epoch (every variant sees them in the
    same order). Optimizer: SGD with momentum (torch.optim.SGD's update: weight decay added to
    the gradient, no dampening, no Nesterov) at a constant learning rate; block l of variant v
    uses lr * variants.lr_scale[v, l] (0 leaves the block's parameters exactly unchanged). See
    the module docstring for which batch trains which block and which pass updates BatchNorm
    statistics. Every parameter of the model is trained (requires_grad is not consulted).

    stacked=True trains all variants as one vmap-ed ensemble; stacked=False one after another
    (per epoch, variant by variant). Random layers (dropout) draw independently per variant,
    so the two modes agree only for models without active randomness.

    store: when given, the full state (weights, buffers, momentum, history) is saved as
    `ensemble.pt` after every epoch, and a resuming store continues from it (either mode).
    on_epoch_end(epoch, states, record): called after every epoch with the variants' current
    state_dicts and the epoch's record ({"epoch", "loss_clean", "loss_skewed", "seconds"},
    losses as per-variant means over the epoch's steps).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(variants, Variants):
        raise TypeError(f"variants must be a Variants, got {type(variants).__name__}")
    _check_args(epochs, lr, momentum, weight_decay)
    owner = _check_groups(model, variants, groups)
    buffer_owner = _buffer_groups(model, groups)
    V = variants.num_variants
    device = next(model.parameters()).device

    # The stacked state: (V, ...) per parameter / buffer, momentum buffers, history.
    params = {n: p.detach().unsqueeze(0).repeat_interleave(V, 0).clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().unsqueeze(0).repeat_interleave(V, 0).clone() for n, b in model.named_buffers()}
    moments: dict[str, torch.Tensor] | None = None
    history: list[dict] = []
    start_epoch = 0
    if store is not None:
        saved = store.load_state(STATE_FILE, map_location=device)
        if saved is not None:
            if saved["names"] != variants.names or not torch.equal(saved["skewed"], variants.skewed) \
                    or not torch.equal(saved["lr_scale"], variants.lr_scale):
                raise ValueError(f"store: {store.root / STATE_FILE} holds other variants ({saved['names'][:4]} ...); "
                                 f"resume with the same variants or start a new run")
            params, buffers, moments = saved["params"], saved["buffers"], saved["momentum"]
            history, start_epoch = saved["history"], saved["epoch"] + 1

    step = _StackedTrainer if stacked else _LoopTrainer
    trainer = step(model, variants, owner, buffer_owner, params, buffers, moments, lr=lr, momentum=momentum,
                   weight_decay=weight_decay)
    for epoch in range(start_epoch, epochs):
        probe = batches(epoch)  # only for its length, when it has one (a generator is not run)
        total = len(probe) * (1 if stacked else V) if hasattr(probe, "__len__") else 0
        bar = Progress(total, f"{'stacked' if stacked else 'loop'} ensemble of {V}, epoch {epoch + 1}/{epochs}",
                       progress)
        t0 = time.perf_counter()
        loss_c, loss_s, steps = trainer.epoch(batches, epoch, bar)
        seconds = time.perf_counter() - t0
        bar.close()
        if steps == 0:
            raise ValueError(f"batches({epoch}) yielded no batch")
        loss_c, loss_s = (loss_c / steps).tolist(), (loss_s / steps).tolist()
        if not all(math.isfinite(x) for x in loss_c + loss_s):
            bad = [variants.names[v] for v in range(V) if not math.isfinite(loss_c[v] + loss_s[v])]
            raise FloatingPointError(f"training loss became non-finite in epoch {epoch + 1} for variants {bad}; "
                                     f"lower the learning rate (lr={lr})")
        record = {"epoch": epoch + 1, "loss_clean": loss_c, "loss_skewed": loss_s, "steps": steps,
                  "seconds": seconds}
        history.append(record)
        params, buffers, moments = trainer.state()
        if store is not None:
            store.save_state(STATE_FILE, {"epoch": epoch, "names": variants.names, "skewed": variants.skewed,
                                          "lr_scale": variants.lr_scale, "params": params, "buffers": buffers,
                                          "momentum": moments, "history": history})
        if on_epoch_end is not None:
            on_epoch_end(epoch, [_unstack(model, params, buffers, v) for v in range(V)], record)
    params, buffers, _ = trainer.state()
    return [_unstack(model, params, buffers, v) for v in range(V)]


class _StackedTrainer:
    """All variants in one vmap(functional_call) forward/backward per step; SGD on stacked tensors."""

    def __init__(self, model, variants, owner, buffer_owner, params, buffers, moments, *, lr, momentum,
                 weight_decay):
        V = variants.num_variants
        self.skeleton = copy.deepcopy(model).train()  # its own tensors are never used by functional_call
        device = next(model.parameters()).device
        self.params = {n: t.to(device).clone().requires_grad_(True) for n, t in params.items()}
        self.buffers = {n: t.to(device).clone() for n, t in buffers.items()}
        self.moments = None if moments is None else {n: moments[n].to(device).clone() for n in self.params}
        skewed = variants.skewed.to(device)

        def per_variant(column, shape_of):  # (V,) column of a (V, L) table, shaped to broadcast over a stack
            return column.reshape((V,) + (1,) * (len(shape_of) - 1))

        # Masks enter vmap as one scalar per variant and parameter; lr factors broadcast over the stack.
        self.mask = {n: skewed[:, owner[n]].to(t.dtype) for n, t in self.params.items()}
        # Learning rates expanded to the parameters' shapes so the update runs as fused foreach ops.
        self.lr = [per_variant((lr * variants.lr_scale[:, owner[n]]).to(device, t.dtype), t.shape).expand_as(t)
                   .contiguous() for n, t in self.params.items()]
        self.buffer_skewed = {n: per_variant(skewed[:, buffer_owner[n]], t.shape) for n, t in self.buffers.items()}
        self.momentum, self.weight_decay = momentum, weight_decay

        def loss(p, b_skewed, b_clean, m, x_clean, x_skewed, y):
            # Each parameter is live in exactly one pass (m = 1: skewed, m = 0: clean), constant in the other.
            p_s = {n: t * m[n] + t.detach() * (1 - m[n]) for n, t in p.items()}
            p_c = {n: t * (1 - m[n]) + t.detach() * m[n] for n, t in p.items()}
            l_s = F.cross_entropy(functional_call(self.skeleton, (p_s, b_skewed), (x_skewed,)), y)
            l_c = F.cross_entropy(functional_call(self.skeleton, (p_c, b_clean), (x_clean,)), y)
            return l_s, l_c

        self.loss = vmap(loss, in_dims=(0, 0, 0, 0, None, None, None), randomness="different")

    def epoch(self, batches, epoch, bar):
        first = next(iter(self.params.values()))
        # Loss sums stay on the device: no host sync per step.
        loss_c = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
        loss_s = torch.zeros_like(loss_c)
        steps = 0
        names = list(self.params)
        for batch in batches(epoch):
            x_clean, x_skewed, y = _check_batch(batch, epoch)
            # Both passes update BN statistics on their own copy; each buffer then keeps the copy of
            # the pass that trains its block (module docstring).
            b_s = {n: t.clone() for n, t in self.buffers.items()}
            b_c = {n: t.clone() for n, t in self.buffers.items()}
            l_s, l_c = self.loss(self.params, b_s, b_c, self.mask, x_clean, x_skewed, y)
            grads = torch.autograd.grad((l_s + l_c).sum(), [self.params[n] for n in names], allow_unused=True)
            with torch.no_grad():
                self._sgd([torch.zeros_like(self.params[n]) if g is None else g for n, g in zip(names, grads)])
                for n in self.buffers:
                    self.buffers[n] = torch.where(self.buffer_skewed[n], b_s[n], b_c[n])
            loss_s += l_s.detach()
            loss_c += l_c.detach()
            steps += 1
            bar.update(1)
        return loss_c.cpu(), loss_s.cpu(), steps

    def _sgd(self, grads):
        """torch.optim.SGD's update (no dampening, no Nesterov) with per-variant, per-block learning
        rates, on every stacked parameter at once (foreach ops)."""
        params = list(self.params.values())
        if self.weight_decay:
            torch._foreach_add_(grads, params, alpha=self.weight_decay)  # grads are fresh tensors
        if self.momentum:
            if self.moments is None:  # torch: the first step's buffer is the gradient itself
                self.moments = {n: g.clone() for n, g in zip(self.params, grads)}
            else:
                bufs = list(self.moments.values())
                torch._foreach_mul_(bufs, self.momentum)
                torch._foreach_add_(bufs, grads)
            grads = list(self.moments.values())
        # a factor 0 subtracts exact zeros: frozen blocks stay bit-identical
        torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr))

    def state(self):
        return ({n: t.detach() for n, t in self.params.items()}, dict(self.buffers),
                None if self.moments is None else dict(self.moments))


class _LoopTrainer:
    """The reference: V plain modules, each with its own torch.optim.SGD, trained one after another
    (per epoch). The gradient of each block is taken from its own pass with torch.autograd.grad
    (no masks); both passes run the plain module's parameters, each on its own copy of the
    buffers, and BN statistics are picked per block afterwards."""

    def __init__(self, model, variants, owner, buffer_owner, params, buffers, moments, *, lr, momentum,
                 weight_decay):
        device = next(model.parameters()).device
        self.V = variants.num_variants
        self.models, self.optimizers, self.skew_names, self.clean_names = [], [], [], []
        self.buffer_owner, self.skewed = buffer_owner, variants.skewed
        num_groups = variants.num_blocks
        for v in range(self.V):
            m = copy.deepcopy(model).train()
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(params[n][v])
                for n, b in m.named_buffers():
                    b.copy_(buffers[n][v])
            named = dict(m.named_parameters())
            param_groups = [{"params": [named[n] for n in named if owner[n] == gi],
                             "lr": lr * float(variants.lr_scale[v, gi])} for gi in range(num_groups)]
            opt = torch.optim.SGD([g for g in param_groups if g["params"]], lr=lr, momentum=momentum,
                                  weight_decay=weight_decay)
            if moments is not None:
                for n, p in named.items():
                    opt.state[p]["momentum_buffer"] = moments[n][v].to(device).clone()
            self.models.append(m)
            self.optimizers.append(opt)
            self.skew_names.append([n for n in named if variants.skewed[v, owner[n]]])
            self.clean_names.append([n for n in named if not variants.skewed[v, owner[n]]])

    def epoch(self, batches, epoch, bar):
        device = next(self.models[0].parameters()).device
        loss_c = torch.zeros(self.V, dtype=torch.float64, device=device)  # on the device: no sync per step
        loss_s = torch.zeros_like(loss_c)
        steps = 0
        for v in range(self.V):
            m, opt = self.models[v], self.optimizers[v]
            named = dict(m.named_parameters())
            steps = 0
            for batch in batches(epoch):
                x_clean, x_skewed, y = _check_batch(batch, epoch)
                # Each pass updates its own copy of the buffers (BN keeps its running stats for
                # backward, so the module's own cannot be reset between the passes).
                b_s = {n: b.clone() for n, b in m.named_buffers()}
                b_c = {n: b.clone() for n, b in m.named_buffers()}
                l_s = F.cross_entropy(functional_call(m, b_s, (x_skewed,)), y)
                l_c = F.cross_entropy(functional_call(m, b_c, (x_clean,)), y)
                grads = {}
                for names, l in ((self.skew_names[v], l_s), (self.clean_names[v], l_c)):
                    if names:
                        got = torch.autograd.grad(l, [named[n] for n in names], allow_unused=True)
                        grads.update({n: torch.zeros_like(named[n]) if g is None else g for n, g in zip(names, got)})
                for n, p in named.items():
                    p.grad = grads[n]
                opt.step()
                with torch.no_grad():
                    for n, b in m.named_buffers():
                        b.copy_(b_s[n] if self.skewed[v, self.buffer_owner[n]] else b_c[n])
                loss_s[v] += l_s.detach()
                loss_c[v] += l_c.detach()
                steps += 1
                bar.update(1)
        return loss_c.cpu(), loss_s.cpu(), steps

    def state(self):
        params, buffers, moments = {}, {}, {}
        for n, _ in self.models[0].named_parameters():
            params[n] = torch.stack([dict(m.named_parameters())[n].detach().clone() for m in self.models])
        for n, _ in self.models[0].named_buffers():
            buffers[n] = torch.stack([dict(m.named_buffers())[n].detach().clone() for m in self.models])
        for n, _ in self.models[0].named_parameters():
            bufs = [opt.state.get(dict(m.named_parameters())[n], {}).get("momentum_buffer")
                    for m, opt in zip(self.models, self.optimizers)]
            if any(b is None for b in bufs):
                return params, buffers, None
            moments[n] = torch.stack([b.detach().clone() for b in bufs])
        return params, buffers, moments


# ---------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict_variants(model: nn.Module, states: Sequence[dict], x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """(V, N, C) logits of every variant (state_dicts of `train_variants`) on images x, in eval
    mode (BatchNorm running statistics), all variants in one vmap pass per batch of images."""
    if not states:
        raise ValueError("states must hold at least one state_dict")
    check_int("batch_size", batch_size)
    skeleton = copy.deepcopy(model).eval()
    device = next(skeleton.parameters()).device
    names = set(dict(skeleton.named_parameters())) | set(dict(skeleton.named_buffers()))
    stacked = {k: torch.stack([s[k].to(device) for s in states]) for k in states[0] if k in names}
    missing = names - set(stacked)
    if missing:
        raise ValueError(f"states: state_dicts lack {sorted(missing)[:5]}")
    run = vmap(lambda p, xb: functional_call(skeleton, p, (xb,)), in_dims=(0, None))
    return torch.cat([run(stacked, x[i:i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)], dim=1)


# ---------------------------------------------------------------------------------------
# Members with their own initialization and data (DeNetDM's seeds x ratios)


class _StackedLinear(torch.autograd.Function):
    """y[m] = x[m] @ weight[m].T + bias[m] for every member m, as one batched matmul each way.

    Its own backward so that the weight gradient is g^T @ x, born in the weights' (M, out,
    in) layout: autograd through baddbmm(bias, x, weight.mT) makes x^T @ g, (M, in, out), and
    then copies it into the parameter's layout (a strided transpose as slow as the matmul at
    DeNetDM's 3072-input layer). Gradients only for the inputs that need one (the first
    layer's images need none)."""

    @staticmethod
    def forward(x, weight, bias):
        if bias is None:
            return torch.bmm(x, weight.mT)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.mT)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        dx = torch.bmm(g, weight) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(g.mT, x) if ctx.needs_input_grad[1] else None
        db = g.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Every member's nn.Linear at once: x (M, B, in), weight (M, out, in) (the stacked layout
    of StackedModules), bias (M, out) or None -> (M, B, out)."""
    if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f"stacked_linear: x (M, B, in) and weight (M, out, in) do not fit: x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    return _StackedLinear.apply(x, weight, bias)


class StackedModules:
    """M modules of one architecture, each with its own weights, as one vmap-ed module.

    Parameters and buffers are stacked along a leading member dimension (the layout of
    torch.func.stack_module_state); `__call__(x)` maps (M, B, ...) inputs to (M, ...) outputs
    with one vmap(functional_call) per call. BatchNorm running statistics are stacked buffers
    updated in place per member (train mode) and read in eval mode. Parameters named in
    `trainable` (default all) are leaf tensors with requires_grad; any torch optimizer whose
    update is elementwise (Adam, SGD) then trains every member exactly as it would alone.

    forward: optionally, a function (skeleton, params, buffers, x) -> the same outputs as the
    vmap pass, written for the stack (e.g. MLPs as `stacked_linear` batched matmuls); it
    replaces the vmap pass, whose per-member linears become batched matmuls in a slower form
    (and a transposing copy of every weight gradient). Only for modules without randomness.

    Unlike `train_variants` (one initialization, per-block gradient routing between a clean
    and a skewed batch), members here differ in their initial weights and their data.
    """

    def __init__(self, modules: Sequence[nn.Module], trainable: Iterable[str] | None = None,
                 forward: Callable | None = None):
        modules = list(modules)
        if not modules:
            raise ValueError("modules must hold at least one module")
        names = [n for n, _ in modules[0].named_parameters()]
        for i, m in enumerate(modules[1:], start=1):
            if [n for n, _ in m.named_parameters()] != names:
                raise ValueError(f"modules[{i}] has other parameters than modules[0]; all members need one architecture")
        self.skeleton = copy.deepcopy(modules[0])
        trainable = set(names if trainable is None else trainable)
        unknown = trainable - set(names)
        if unknown:
            raise ValueError(f"trainable: {sorted(unknown)[:5]} are not parameters of the module")
        self.trainable = [n for n in names if n in trainable]
        self.params = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in modules]).clone()
                       .requires_grad_(n in trainable) for n in names}
        self.buffers = {n: torch.stack([dict(m.named_buffers())[n].detach() for m in modules]).clone()
                        for n, _ in modules[0].named_buffers()}

        def call(p, b, x, *args):
            return functional_call(self.skeleton, (p, b), (x, *args))

        self.forward = forward
        self._run = vmap(call, in_dims=(0, 0, 0), randomness="different") if forward is None else \
            functools.partial(forward, self.skeleton)

    @property
    def num_members(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __call__(self, x: torch.Tensor, **extra) -> torch.Tensor:
        """(M, B, ...) inputs -> (M, ...) outputs; extra: keyword inputs of a stacked `forward`."""
        if x.shape[0] != self.num_members:
            raise ValueError(f"x must have the member dimension {self.num_members} first, got {tuple(x.shape)}")
        if extra and self.forward is None:
            raise TypeError(f"inputs {sorted(extra)} need a stacked forward (StackedModules(..., forward=))")
        return self._run(self.params, self.buffers, x, **extra)

    def train(self, mode: bool = True) -> "StackedModules":
        self.skeleton.train(mode)
        return self

    def eval(self) -> "StackedModules":
        return self.train(False)

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [self.params[n] for n in self.trainable]

    def state(self) -> dict:
        """Detached copies of the stacked parameters and buffers (to save or to keep a best state)."""
        return {"params": {n: t.detach().clone() for n, t in self.params.items()},
                "buffers": {n: t.clone() for n, t in self.buffers.items()}}

    def load_state(self, state: dict, members: torch.Tensor | None = None) -> None:
        """Copy a `state()` in, for every member or (members: (M,) bool) only the chosen ones."""
        with torch.no_grad():
            for kind in ("params", "buffers"):
                own = getattr(self, kind)
                for n, t in own.items():
                    src = state[kind][n].to(t.device)
                    if members is None:
                        t.copy_(src)
                    else:
                        t.copy_(torch.where(members.to(t.device).reshape((-1,) + (1,) * (t.dim() - 1)), src, t))

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's state_dict (the skeleton's keys)."""
        return _unstack(self.skeleton, self.params, self.buffers, i)

    def member_module(self, i: int) -> nn.Module:
        """A plain module holding member i's weights."""
        m = copy.deepcopy(self.skeleton)
        m.load_state_dict(self.member_state_dict(i))
        return m


__all__ = ["Variants", "block_parameter_groups", "train_variants", "predict_variants", "StackedModules",
           "stacked_linear", "HEAD"]
