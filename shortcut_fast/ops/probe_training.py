"""Fused minibatch training of K linear probes at once, for probe families without a
closed form (docs/experiments.md#feature-complexity: the gradient path of the V-information probes).

Every probe reads the same features x (N, D) and predicts its own target column:
  softmax   targets[:, k] int64 in [0, C): weight (K, D, C), bias (K, C), cross-entropy.
  logistic  targets[:, k] int64 in {0, 1}: weight (K, D), bias (K,), binary cross-entropy.
  gaussian  targets[:, k] float: weight (K, D), bias (K,) (the mean), log_var (K,) (a
            learned variance per probe), Gaussian negative log-likelihood.
One training step is one forward + loss + gradient for all probes on a shared minibatch
(probe_step: the torch reference below, or one fused Triton kernel, kernels/probe_training.py),
then one Adam update of all parameters in torch (shared by both backends). The kernel's two
products (logits, weight gradient) run at `precision` (shortcut_fast.ops.precision; "auto":
AUTO["probe_step"] on a GPU, "ieee" elsewhere); the torch step ignores it.

Objective per probe: mean loss over samples + weight_decay/2 * ||weight||^2 (the bias and
log_var are not penalized, as in scikit-learn). sklearn LogisticRegression(C=c) on N samples
minimizes ||w||^2/2 + c * sum log-loss, i.e. weight_decay = 1 / (c * N) here.

V-information (Xu et al. 2020; Fel et al. 2024): I_V(X -> z) = H_V(z) - H_V(z | X) in nats,
where H_V(z | X) is the held-out loss of the trained probe and H_V(z) the held-out loss of
the best constant predictor fitted on the training targets (class frequencies with a 0.5
pseudo-count so unseen classes keep a finite loss; for Gaussian targets their mean and
variance). It is clipped at 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from shortcut_fast.backends import dispatch
from shortcut_fast.ops._checks import FLOAT_DTYPES, check_finite, check_int, check_tensor
from shortcut_fast.ops.precision import ignores_precision, resolve

FAMILIES = ("softmax", "logistic", "gaussian")
AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
_LOG_2PI = math.log(2 * math.pi)
_PSEUDO_COUNT = 0.5


class ProbeStep(NamedTuple):
    """Mean loss per probe (K,) on the minibatch and its gradients (same shapes as the
    parameters; grad_log_var is None except for the Gaussian family)."""

    loss: torch.Tensor
    grad_weight: torch.Tensor
    grad_bias: torch.Tensor
    grad_log_var: torch.Tensor | None


@dataclass
class TrainedProbes:
    """K trained probes and their scores (all losses are mean nats per sample)."""

    family: str
    weight: torch.Tensor  # (K, D, C) softmax, (K, D) otherwise
    bias: torch.Tensor  # (K, C) softmax, (K,) otherwise
    log_var: torch.Tensor | None  # (K,) gaussian
    train_loss: torch.Tensor  # (K,) on the full training set after training, without the penalty
    heldout_loss: torch.Tensor  # (K,) H_V(z | X)
    heldout_accuracy: torch.Tensor | None  # (K,) softmax/logistic
    constant_loss: torch.Tensor  # (K,) H_V(z): held-out loss of the best constant predictor
    v_information: torch.Tensor  # (K,) max(constant_loss - heldout_loss, 0)
    evaluated_on: str  # "heldout", or "train" when no held-out set was given

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, K, C) for softmax, P(y=1) (N, K) for logistic, means (N, K)."""
        z = _logits(x.to(self.weight.dtype), _as3(self.weight), self.bias.reshape(self.weight.shape[0], -1))
        if self.family == "softmax":
            return torch.softmax(z, dim=-1)
        z = z[..., 0]
        return torch.sigmoid(z) if self.family == "logistic" else z


# ---------------------------------------------------------------------------------------
# Reference step (analytic gradients, mirrors the kernel)


def _as3(weight: torch.Tensor) -> torch.Tensor:
    return weight if weight.dim() == 3 else weight.unsqueeze(-1)


def _logits(x: torch.Tensor, w3: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(N, D) x (K, D, C) -> (N, K, C) as one matmul against the flattened (D, K*C) weights."""
    K, D, C = w3.shape
    flat = w3.permute(1, 0, 2).reshape(D, K * C)
    return (x @ flat).view(x.shape[0], K, C) + b2


def _epilogue(z: torch.Tensor, targets: torch.Tensor, family: str, log_var: torch.Tensor | None):
    """Per-sample loss (N, K), residual dLoss/dz (N, K, C) and per-sample dLoss/dlog_var."""
    if family == "softmax":
        lse = torch.logsumexp(z, dim=-1)
        idx = targets.long().unsqueeze(-1)
        loss = lse - z.gather(-1, idx).squeeze(-1)
        r = torch.softmax(z, dim=-1)
        r.scatter_add_(-1, idx, torch.full_like(idx, -1, dtype=r.dtype))
        return loss, r, None
    z1 = z[..., 0]
    t = targets.to(z.dtype)
    if family == "logistic":
        loss = torch.nn.functional.softplus(z1) - z1 * t
        return loss, (torch.sigmoid(z1) - t).unsqueeze(-1), None
    diff = z1 - t
    inv_var = torch.exp(-log_var)
    sq = diff * diff * inv_var
    loss = 0.5 * (_LOG_2PI + log_var + sq)
    return loss, (diff * inv_var).unsqueeze(-1), 0.5 * (1 - sq)


def probe_step_reference(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         log_var: torch.Tensor | None, family: str) -> ProbeStep:
    """Pure-PyTorch step: mean loss per probe and analytic gradients (no autograd)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    K = weight.shape[0]
    w3 = _as3(weight).to(dtype)
    b2 = bias.to(dtype).reshape(K, -1)
    lv = None if log_var is None else log_var.to(dtype)
    N = x.shape[0]
    z = _logits(x, w3, b2)
    loss, r, dlv = _epilogue(z, targets, family, lv)
    inv_n = 1.0 / max(N, 1)
    D, C = w3.shape[1], w3.shape[2]
    grad_w = (x.T @ r.reshape(N, K * C)).view(D, K, C).permute(1, 0, 2) * inv_n
    grad_b = r.sum(0) * inv_n
    if weight.dim() == 2:
        grad_w, grad_b = grad_w[..., 0], grad_b[..., 0]
    return ProbeStep(loss.sum(0) * inv_n, grad_w.contiguous(), grad_b,
                     None if dlv is None else dlv.sum(0) * inv_n)


def probe_step_bounds(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      log_var: torch.Tensor | None, family: str) -> ProbeStep:
    """The step's outputs as means of absolute per-sample terms (mean |loss|, |x|^T |R| / N,
    mean |R|, mean |d loss / d log_var|): the scale of their rounding errors, which does not
    shrink when the terms cancel (shortcut_fast.ops.precision)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    K = weight.shape[0]
    w3 = _as3(weight).to(dtype)
    lv = None if log_var is None else log_var.to(dtype)
    N, D, C = x.shape[0], w3.shape[1], w3.shape[2]
    loss, r, dlv = _epilogue(_logits(x, w3, bias.to(dtype).reshape(K, -1)), targets, family, lv)
    inv_n = 1.0 / max(N, 1)
    grad_w = (x.abs().T @ r.abs().reshape(N, K * C)).view(D, K, C).permute(1, 0, 2) * inv_n
    grad_b = r.abs().sum(0) * inv_n
    if weight.dim() == 2:
        grad_w, grad_b = grad_w[..., 0], grad_b[..., 0]
    return ProbeStep(loss.abs().sum(0) * inv_n, grad_w.contiguous(), grad_b,
                     None if dlv is None else dlv.abs().sum(0) * inv_n)


# ---------------------------------------------------------------------------------------
# Argument handling


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def _check_features(name: str, x) -> None:
    check_tensor(name, x, ndim=2, shape_doc="(N, D)", dtypes=FLOAT_DTYPES)
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one feature column (D >= 1), got shape {tuple(x.shape)}")
    check_finite(name, x)


def _check_targets(name: str, targets, n: int, k: int | None, family: str, num_classes: int | None,
                   device: torch.device) -> None:
    shape_doc = f"({n}, K)" if k is None else f"({n}, {k})"
    if family == "gaussian":
        check_tensor(name, targets, ndim=2, shape_doc=shape_doc, dtypes=FLOAT_DTYPES, device=device)
    else:
        check_tensor(name, targets, ndim=2, shape_doc=shape_doc, dtypes=(torch.int64,), device=device)
    if targets.shape[0] != n or (k is not None and targets.shape[1] != k) or targets.shape[1] < 1:
        raise ValueError(f"{name} must have shape {shape_doc} with K >= 1, got shape {tuple(targets.shape)}")
    if family == "gaussian":
        check_finite(name, targets)
    elif targets.numel() and not torch.compiler.is_compiling():  # a value check: skipped while tracing
        hi = num_classes if family == "softmax" else 2
        lo_v, hi_v = int(targets.min()), int(targets.max())
        if lo_v < 0 or hi_v >= hi:
            what = f"class indices in [0, {hi}) (num_classes={hi})" if family == "softmax" else "binary labels 0/1"
            raise ValueError(f"{name} must hold {what} for family {family!r}, got values in [{lo_v}, {hi_v}]")


def _param_shapes(K: int, D: int, C: int, family: str) -> dict:
    if family == "softmax":
        return {"weight": (K, D, C), "bias": (K, C)}
    return {"weight": (K, D), "bias": (K,), "log_var": (K,)}


def _check_params(weight, bias, log_var, K: int, D: int, family: str, device) -> int:
    check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=device)
    C = weight.shape[-1] if (family == "softmax" and weight.dim() == 3) else 1
    shapes = _param_shapes(K, D, C, family)
    for name, value in (("weight", weight), ("bias", bias)):
        check_tensor(name, value, dtypes=FLOAT_DTYPES, device=device)
        if tuple(value.shape) != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]} for family {family!r} "
                             f"(K={K} targets, D={D} features), got shape {tuple(value.shape)}")
    if family == "gaussian":
        check_tensor("log_var", log_var, ndim=1, shape_doc=f"({K},)", dtypes=FLOAT_DTYPES, device=device)
        if log_var.shape[0] != K:
            raise ValueError(f"log_var must have shape ({K},), got shape {tuple(log_var.shape)}")
    elif log_var is not None:
        raise ValueError(f"log_var is only used by family 'gaussian', got one for family {family!r}")
    return C


_MAX_TRITON_CLASSES = 256  # kernels.probe_training.MAX_CLASSES (not imported: it imports triton)


def _step_impl(x: torch.Tensor, backend: str, num_classes: int = 1):
    """The probe-step implementation `backend` resolves to for x (see _STEP)."""
    unsupported = {}
    if x.dtype == torch.float64:
        unsupported["triton"] = "the triton kernel computes in float32; float64 input needs torch"
    elif num_classes > _MAX_TRITON_CLASSES:
        unsupported["triton"] = (f"the triton kernel keeps all classes of a probe in one tile: at most "
                                 f"{_MAX_TRITON_CLASSES} classes, got {num_classes}")
    return dispatch("probe_step", backend, x.device, _STEP, auto_order=AUTO_ORDER, unsupported=unsupported)


def _triton_step(x, targets, weight, bias, log_var, family: str, precision: str) -> ProbeStep:
    from shortcut_fast.kernels import probe_training as triton_kernels

    K = weight.shape[0]
    w3 = _as3(weight).float()
    b2 = bias.float().reshape(K, -1)
    lv = log_var.float() if log_var is not None else b2.new_zeros(K)
    loss, gw, gb, glv = triton_kernels.probe_step_op(
        x.float().contiguous(), targets.float().contiguous(), w3.contiguous(), b2.contiguous(), lv.contiguous(),
        triton_kernels.FAMILY_CODES[family], precision)
    if weight.dim() == 2:
        gw, gb = gw[..., 0], gb[..., 0]
    return ProbeStep(loss, gw, gb, glv if family == "gaussian" else None)


# No compiled op: the step's matmuls already run in cuBLAS/MKL; the triton kernel fuses
# the forward, the loss and the gradient. Both take (..., family, precision).
_STEP = {"torch": ignores_precision(probe_step_reference), "triton": _triton_step}


# ---------------------------------------------------------------------------------------
# Public API


def probe_step(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               log_var: torch.Tensor | None = None, *, family: str, backend: str = "auto",
               precision: str = "auto") -> ProbeStep:
    """One forward + loss + gradient of K probes on the minibatch (x (N, D), targets (N, K)).

    Parameter shapes: softmax weight (K, D, C), bias (K, C); logistic/gaussian weight (K, D),
    bias (K,), and log_var (K,) for gaussian. Loss is the mean over the N samples, gradients
    are of that mean (no weight decay). backend: auto|torch|triton. precision: of the triton
    kernel's products (module docstring).
    """
    _check_family(family)
    _check_features("x", x)
    precision = resolve("probe_step", precision, x.device)
    N, D = x.shape
    K = weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() >= 1 else 0
    C = _check_params(weight, bias, log_var, K, D, family, x.device)
    if family == "softmax" and C < 2:
        raise ValueError(f"weight must have C >= 2 classes in its last dimension for family 'softmax', got {C}")
    _check_targets("targets", targets, N, K, family, C, x.device)
    return _step_impl(x, backend, C)(x, targets, weight, bias, log_var, family, precision)


@torch.no_grad()
def evaluate_probes(x: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    log_var: torch.Tensor | None, family: str, chunk: int = 4096):
    """Mean loss (K,) and accuracy (K,) (None for gaussian) over all rows, in row chunks so
    no N x K x C tensor is materialized at once."""
    K = weight.shape[0]
    w3, b2 = _as3(weight), bias.reshape(K, -1)
    total = torch.zeros(K, dtype=w3.dtype, device=w3.device)
    correct = torch.zeros(K, dtype=w3.dtype, device=w3.device)
    N = x.shape[0]
    for n0 in range(0, N, chunk):
        xb, tb = x[n0:n0 + chunk].to(w3.dtype), targets[n0:n0 + chunk]
        z = _logits(xb, w3, b2)
        loss, _, _ = _epilogue(z, tb, family, log_var)
        total += loss.sum(0)
        if family == "softmax":
            correct += (z.argmax(-1) == tb).sum(0)
        elif family == "logistic":
            correct += ((z[..., 0] > 0).long() == tb).sum(0)
    n = max(N, 1)
    return total / n, (None if family == "gaussian" else correct / n)


def _constant_loss(train_t: torch.Tensor, eval_t: torch.Tensor, family: str, num_classes: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Held-out loss of the best constant predictor fitted on the training targets: H_V(z)."""
    if family == "gaussian":
        t = train_t.to(dtype)
        mean, var = t.mean(0), t.var(0, unbiased=False).clamp_min(1e-12)
        e = eval_t.to(dtype)
        return 0.5 * (_LOG_2PI + torch.log(var) + ((e - mean) ** 2).mean(0) / var)
    C = num_classes if family == "softmax" else 2
    K = train_t.shape[1]
    counts = torch.zeros(C, K, dtype=dtype, device=train_t.device)
    counts.scatter_add_(0, train_t, torch.ones_like(train_t, dtype=dtype))
    log_p = torch.log((counts + _PSEUDO_COUNT) / (train_t.shape[0] + C * _PSEUDO_COUNT))  # (C, K)
    return -log_p.gather(0, eval_t).mean(0)


def _init_params(x_dtype, device, K: int, D: int, C: int, targets: torch.Tensor, family: str):
    """Zero weights; biases at the best constant predictor (a good start for a convex loss)."""
    dtype = x_dtype
    weight = torch.zeros(_param_shapes(K, D, C, family)["weight"], dtype=dtype, device=device)
    log_var = None
    if family == "gaussian":
        t = targets.to(dtype)
        bias = t.mean(0)
        log_var = torch.log(t.var(0, unbiased=False).clamp_min(1e-6))
    else:
        Cn = C if family == "softmax" else 2
        counts = torch.zeros(Cn, K, dtype=dtype, device=device)
        counts.scatter_add_(0, targets, torch.ones_like(targets, dtype=dtype))
        log_p = torch.log((counts + _PSEUDO_COUNT) / (targets.shape[0] + Cn * _PSEUDO_COUNT))
        bias = log_p.T.contiguous() if family == "softmax" else log_p[1] - log_p[0]
    return weight, bias, log_var


def train_probes(x: torch.Tensor, targets: torch.Tensor, family: str, *, num_classes: int | None = None,
                 heldout: tuple[torch.Tensor, torch.Tensor] | None = None, epochs: int = 50,
                 batch_size: int = 1024, lr: float = 1e-2, weight_decay: float = 0.0, seed: int = 0,
                 backend: str = "auto", precision: str = "auto", progress: bool = False) -> TrainedProbes:
    """Train K probes of one family on x (N, D) -> targets (N, K) with minibatch Adam.

    All probes share each minibatch (one fused step per minibatch). The learning rate
    follows a cosine schedule from lr to 0 over epochs * ceil(N / batch_size) steps so
    the last iterates settle at the optimum instead of hovering in Adam's noise ball.
    Parameters start at zero weights and the best constant predictor's bias. Features are
    used as given: standardize them first for fast, well-conditioned training.
    heldout: (x_heldout, targets_heldout) to score the probes on; without it the scores are
    computed on the training set (evaluated_on == "train"). precision: of every step's
    products (probe_step); the scores come from a float32 (float64) evaluation whatever it is.
    Returns TrainedProbes.
    """
    _check_family(family)
    _check_features("x", x)
    precision = resolve("probe_step", precision, x.device)
    N, D = x.shape
    if family == "softmax":
        if num_classes is None:
            raise ValueError("num_classes is required for family 'softmax'")
        check_int("num_classes", num_classes, minimum=2)
    elif num_classes is not None and not (family == "logistic" and num_classes == 2):
        raise ValueError(f"num_classes is only used by family 'softmax', got {num_classes!r} for {family!r}")
    C = num_classes if family == "softmax" else 1
    if N < 1:
        raise ValueError(f"x must have at least one row, got shape {tuple(x.shape)}")
    _check_targets("targets", targets, N, None, family, num_classes, x.device)
    K = targets.shape[1]
    if heldout is not None:
        if not isinstance(heldout, (tuple, list)) or len(heldout) != 2:
            raise TypeError("heldout must be a (x_heldout, targets_heldout) pair")
        xh, th = heldout
        _check_features("heldout x", xh)
        if xh.shape[1] != D:
            raise ValueError(f"heldout x must have D={D} feature columns like x, got shape {tuple(xh.shape)}")
        if xh.device != x.device:
            raise ValueError(f"heldout x must be on {x.device} (like x), got {xh.device}")
        _check_targets("heldout targets", th, xh.shape[0], K, family, num_classes, x.device)
    check_int("epochs", epochs, minimum=1)
    check_int("batch_size", batch_size, minimum=1)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    step_impl = _step_impl(x, backend, C)

    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight, bias, log_var = _init_params(dtype, x.device, K, D, C, targets, family)
    params = [p for p in (weight, bias, log_var) if p is not None]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = -(-N // batch_size)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    # The kernel reads targets as float32 (class indices are exact): convert once, not per step.
    step_targets = targets.float() if step_impl is _triton_step else targets
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(N, generator=generator).to(x.device)
        epoch_loss = torch.zeros(K, dtype=dtype, device=x.device)
        for s in range(steps_per_epoch):
            idx = order[s * batch_size:(s + 1) * batch_size]
            step = step_impl(x[idx], step_targets[idx], weight, bias, log_var, family, precision)
            grads = [step.grad_weight.to(dtype), step.grad_bias.to(dtype)]
            if weight_decay:
                grads[0] = grads[0] + weight_decay * weight
            if log_var is not None:
                grads.append(step.grad_log_var.to(dtype))
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            schedule.step()
            epoch_loss += step.loss.to(dtype) * idx.numel()
        if progress:
            print(f"train_probes epoch {epoch + 1}/{epochs}: mean minibatch loss "
                  f"{float(epoch_loss.mean()) / N:.5f} over {K} probes")

    weight, bias = weight.detach(), bias.detach()
    log_var = None if log_var is None else log_var.detach()
    train_loss, _ = evaluate_probes(x, targets, weight, bias, log_var, family)
    if heldout is None:
        xh, th, evaluated_on = x, targets, "train"
    else:
        evaluated_on = "heldout"
    heldout_loss, heldout_acc = evaluate_probes(xh, th, weight, bias, log_var, family)
    constant = _constant_loss(targets, th, family, num_classes or 2, dtype)
    return TrainedProbes(
        family=family, weight=weight, bias=bias, log_var=log_var, train_loss=train_loss,
        heldout_loss=heldout_loss, heldout_accuracy=heldout_acc, constant_loss=constant,
        v_information=(constant - heldout_loss).clamp_min(0), evaluated_on=evaluated_on)
