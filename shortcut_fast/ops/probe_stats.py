"""Linear probes for thousands of targets from streaming sufficient statistics.

Feature complexity by V-information (docs/experiments.md#feature-complexity) needs, per
layer, one ridge probe from the layer's activations x (N, D) to each of K feature values
z (N, K), scored on held-out data. With the linear-Gaussian family these collapse to one multi-target
least-squares problem:

  probe_stats(x, z)        one chunk's (x^T x, x^T z, sum x, sum z, sum z^2)
  ProbeStats               the streaming accumulator (train or held-out), resumable, mergeable
  fit_linear_probes(...)   ridge with intercept for every target and every alpha from the
                           statistics only: one eigendecomposition serves all alphas, the
                           held-out SSE comes from the held-out statistics (never an N x K
                           prediction matrix), alpha is chosen per target by held-out SSE.

Objective per target k (scikit-learn Ridge, sums not means):
    min_{w, b} ||z_k - X w - b||^2 + alpha ||w||^2

V-information of a target from the held-out R^2 of its probe (V_INFORMATION_FORMS):
  "r2"             Gaussian predictors of FIXED variance with a linear mean: H_V is the mean
                   squared error up to constants, so I_V = Var(z) * R^2, i.e. R^2 for a
                   standardized z (clipped at 0). This is the paper's definition as far as it
                   can be told (docs/experiments.md#feature-complexity: Fel et al. 2024 describe the
                   fixed-variance linear-Gaussian family on standardized features and publish
                   no code), and our default.
  "gaussian-nats"  Gaussian predictors whose variance is LEARNED too: the best variance is the
                   mean squared error itself, so H_V = 1/2 log(2 pi e MSE) and
                   I_V = 1/2 log(Var z / MSE) = -1/2 log(1 - R^2) nats (clipped at 0; R^2 = 1
                   is capped at 1 - R^2 = float64 eps, about 18 nats). Unbounded: it separates
                   well-decodable targets that R^2 squeezes near 1 (R^2 0.99 -> 2.3 nats,
                   0.9999 -> 4.6 nats). ops.probe_training's gaussian family is its gradient-
                   trained counterpart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shortcut_fast.backends import compiled_op, define_op, dispatch, triton_kernel
from shortcut_fast.ops._checks import FLOAT_DTYPES, all_true, check_finite, check_int, check_tensor, is_finite
from shortcut_fast.ops.precision import check_precision, ignores_precision, resolve

__all__ = ["DEFAULT_ALPHA_FACTORS", "V_INFORMATION_FORMS", "LinearProbes", "ProbeStats", "accumulate_probe_stats", "fit_linear_probes",
           "fit_probes", "probe_stats", "probe_stats_reference", "v_information_from_r2"]

STATS_DTYPES = (torch.float32, torch.float64)
# Default alpha grid: DEFAULT_ALPHA_FACTORS * trace(Xc^T Xc) / D, i.e. relative to the
# mean eigenvalue of the centered train Gram matrix (1e-6 ... 1e2, 9 values).
DEFAULT_ALPHA_FACTORS = torch.logspace(-6, 2, 9, dtype=torch.float64)
V_INFORMATION_FORMS = ("r2", "gaussian-nats")

StatsTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------
# probe_stats: one chunk


def probe_stats_reference(x: torch.Tensor, z: torch.Tensor) -> StatsTuple:
    """Pure-PyTorch ground truth: (x^T x, x^T z, sum x, sum z, sum z^2) in x's dtype."""
    return x.mT @ x, x.mT @ z, x.sum(0), z.sum(0), (z * z).sum(0)


def _stats_dtype(x: torch.Tensor, z: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, z.dtype) else torch.float32


def _check_pair(x, z, allow_nonfinite: bool, x_name: str = "x", z_name: str = "z") -> None:
    check_tensor(x_name, x, ndim=2, shape_doc="(N, D)", dtypes=FLOAT_DTYPES)
    check_tensor(z_name, z, ndim=2, shape_doc="(N, K)", dtypes=FLOAT_DTYPES, device=x.device)
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"{z_name} must have as many rows as {x_name} ({x.shape[0]}), got shape {tuple(z.shape)}")
    if not allow_nonfinite and not all_true(is_finite(x), is_finite(z)):  # one sync for both
        check_finite(x_name, x)
        check_finite(z_name, z)


def probe_stats(x: torch.Tensor, z: torch.Tensor, *, backend: str = "auto", precision: str = "auto",
                allow_nonfinite: bool = False) -> StatsTuple:
    """Sufficient statistics of linear probes for one chunk.

    x (N, D), z (N, K) -> (x^T x (D, D), x^T z (D, K), sum x (D,), sum z (K,), sum z^2 (K,)),
    float64 if either input is float64, else float32 (both inputs are cast to it).
    precision (shortcut_fast.ops.precision): of the triton kernel's products ("auto":
    AUTO["probe_stats"] on a GPU, "ieee" elsewhere); the other backends are exact float32
    (float64) GEMMs and ignore it.
    """
    _check_pair(x, z, allow_nonfinite)
    precision = resolve("probe_stats", precision, x.device)
    dtype = _stats_dtype(x, z)
    x, z = x.to(dtype), z.to(dtype)
    unsupported = {}
    if x.dtype == torch.float64:
        unsupported["triton"] = "the triton kernel computes in float32; float64 input needs torch/cpp/cuda"
    run = dispatch("probe_stats", backend, x.device, _PROBE_STATS, unsupported=unsupported)
    return tuple(run(x.contiguous(), z.contiguous(), precision))


# Sufficient statistics of linear probes for one chunk: x (N,D), z (N,K), same float dtype ->
# (x^T x (D,D), x^T z (D,K), sum_n x (D), sum_n z (K), sum_n z^2 (K)), in x's dtype (float32/float64).
@define_op("probe_stats(Tensor x, Tensor z) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _probe_stats_fake(x, z):
    D, K = x.shape[1], z.shape[1]
    return x.new_empty((D, D)), x.new_empty((D, K)), x.new_empty((D,)), x.new_empty((K,)), x.new_empty((K,))


# Every implementation takes (x, z, precision); only triton has precisions.
_PROBE_STATS = {
    "torch": ignores_precision(probe_stats_reference),
    "cpp": ignores_precision(compiled_op("probe_stats")),
    "cuda": ignores_precision(compiled_op("probe_stats")),
    "triton": triton_kernel("probe_stats", "probe_stats_triton"),
}


# ---------------------------------------------------------------------------------------
# Streaming accumulator


class ProbeStats:
    """Streaming probe statistics of (x, z) pairs: n, sum_x, sum_z, sumsq_z, xx, xz.

    Data are accumulated around a shift (the mean of the first non-empty chunk: shift_x,
    shift_z), so sum_x = sum (x - shift_x), xx = sum (x - shift_x)(x - shift_x)^T, etc.
    Without it, float32 x^T x of data with a large mean loses the variance to cancellation;
    every consumer (merge, fit_linear_probes) is shift-invariant.
    """

    _TENSORS = ("shift_x", "shift_z", "sum_x", "sum_z", "sumsq_z", "xx", "xz")

    def __init__(self, dim: int, num_targets: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", backend: str = "auto", precision: str = "auto"):
        check_int("dim", dim, 1)
        check_int("num_targets", num_targets, 1)
        if dtype not in STATS_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dim, self.num_targets, self.dtype = dim, num_targets, dtype
        self.device = torch.device(device)
        check_precision(precision)
        self.backend, self.precision = backend, precision  # of every update's probe_stats
        self.n = 0
        D, K = dim, num_targets
        z = lambda *shape: torch.zeros(shape, dtype=dtype, device=self.device)  # noqa: E731
        self.shift_x, self.shift_z = z(D), z(K)
        self.sum_x, self.sum_z, self.sumsq_z = z(D), z(K), z(K)
        self.xx, self.xz = z(D, D), z(D, K)

    def __repr__(self) -> str:
        return (f"ProbeStats(dim={self.dim}, num_targets={self.num_targets}, n={self.n}, dtype={self.dtype}, "
                f"device={self.device})")

    def update(self, x: torch.Tensor, z: torch.Tensor, *, allow_nonfinite: bool = False) -> "ProbeStats":
        """Add a chunk: x (n, dim), z (n, num_targets), any float dtype (cast to self.dtype)."""
        _check_pair(x, z, allow_nonfinite)
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}) (dim={self.dim}), got shape {tuple(x.shape)}")
        if z.shape[1] != self.num_targets:
            raise ValueError(f"z must have shape (n, {self.num_targets}) (num_targets={self.num_targets}), "
                             f"got shape {tuple(z.shape)}")
        return self._add(x, z)

    def _add(self, x: torch.Tensor, z: torch.Tensor) -> "ProbeStats":
        """update without its checks (no host sync), for passes over many batches whose shapes
        are right by construction and which count NaN/Inf on the device (nonfinite_count) to
        read once at the end."""
        if x.shape[0] == 0:
            return self
        x = x.to(device=self.device, dtype=self.dtype)
        z = z.to(device=self.device, dtype=self.dtype)
        if self.n == 0:
            self.shift_x = x.to(torch.float64).mean(0).to(self.dtype)
            self.shift_z = z.to(torch.float64).mean(0).to(self.dtype)
        xx, xz, sx, sz, sq = probe_stats(x - self.shift_x, z - self.shift_z, backend=self.backend,
                                         precision=self.precision, allow_nonfinite=True)  # checked above
        self.xx += xx
        self.xz += xz
        self.sum_x += sx
        self.sum_z += sz
        self.sumsq_z += sq
        self.n += x.shape[0]
        return self

    def moments(self, center_x: torch.Tensor, center_z: torch.Tensor) -> StatsTuple:
        """float64 (xx, xz, sum x, sum z, sum z^2) of the data taken around (center_x, center_z).

        With u = x - shift_x, d = shift_x - center_x (likewise for z):
        sum (u + d)(v + e)^T = xz + s_u e^T + d s_v^T + n d e^T, and so on.
        """
        f64 = dict(dtype=torch.float64, device=self.device)
        n = float(self.n)
        dx = self.shift_x.to(**f64) - center_x.to(**f64)
        dz = self.shift_z.to(**f64) - center_z.to(**f64)
        sx, sz = self.sum_x.to(**f64), self.sum_z.to(**f64)
        xx = self.xx.to(copy=True, **f64).addr_(sx, dx).addr_(dx, sx).addr_(dx, dx, alpha=n)
        xz = self.xz.to(copy=True, **f64).addr_(sx, dz).addr_(dx, sz).addr_(dx, dz, alpha=n)
        sq = self.sumsq_z.to(**f64) + 2 * dz * sz + n * dz * dz
        return xx, xz, sx + n * dx, sz + n * dz, sq

    def merge(self, other: "ProbeStats") -> "ProbeStats":
        """Add the statistics of another accumulator (any shift, dtype or device) into self."""
        if not isinstance(other, ProbeStats):
            raise TypeError(f"other must be a ProbeStats, got {type(other).__name__}")
        if (other.dim, other.num_targets) != (self.dim, self.num_targets):
            raise ValueError(f"other must have dim={self.dim}, num_targets={self.num_targets}, got "
                             f"dim={other.dim}, num_targets={other.num_targets}")
        if other.n == 0:
            return self
        if self.n == 0:
            for name in self._TENSORS:
                setattr(self, name, getattr(other, name).to(device=self.device, dtype=self.dtype, copy=True))
            self.n = other.n
            return self
        cx, cz = self.shift_x.to(other.device), self.shift_z.to(other.device)
        parts = other.moments(cx, cz)
        for name, part in zip(("xx", "xz", "sum_x", "sum_z", "sumsq_z"), parts):
            getattr(self, name).add_(part.to(device=self.device, dtype=self.dtype))
        self.n += other.n
        return self

    def state_dict(self) -> dict:
        """Everything needed to resume (torch.save-able)."""
        state = {name: getattr(self, name) for name in self._TENSORS}
        state.update(dim=self.dim, num_targets=self.num_targets, n=self.n, dtype=str(self.dtype).replace("torch.", ""))
        return state

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str | None = None,
                        backend: str = "auto", precision: str = "auto") -> "ProbeStats":
        missing = [k for k in ("dim", "num_targets", "n", "dtype", *cls._TENSORS) if k not in state]
        if missing:
            raise ValueError(f"state is missing the entries {missing}; expected a ProbeStats.state_dict()")
        dtype = getattr(torch, state["dtype"]) if isinstance(state["dtype"], str) else state["dtype"]
        device = state["xx"].device if device is None else device
        stats = cls(int(state["dim"]), int(state["num_targets"]), dtype=dtype, device=device, backend=backend,
                    precision=precision)
        for name in cls._TENSORS:
            value = state[name]
            expected = tuple(getattr(stats, name).shape)
            if tuple(value.shape) != expected:
                raise ValueError(f"state[{name!r}] must have shape {expected}, got {tuple(value.shape)}")
            setattr(stats, name, value.to(device=stats.device, dtype=dtype, copy=True))
        stats.n = int(state["n"])
        return stats


def _default_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def accumulate_probe_stats(x: torch.Tensor, z: torch.Tensor, *, chunk_size: int = 4096,
                           dtype: torch.dtype | None = None, backend: str = "auto", precision: str = "auto",
                           device: torch.device | str | None = None, allow_nonfinite: bool = False) -> ProbeStats:
    """ProbeStats of in-memory x (N, D), z (N, K), chunk_size rows at a time.

    dtype None: float64 if x or z is float64, else float32. device None: x's device.
    precision: of every chunk's probe_stats.
    """
    _check_pair(x, z, allow_nonfinite)
    check_int("chunk_size", chunk_size, 1)
    stats = ProbeStats(x.shape[1], z.shape[1], dtype=dtype or _default_dtype(x, z),
                       device=x.device if device is None else device, backend=backend, precision=precision)
    for start in range(0, x.shape[0], chunk_size):
        stats.update(x[start:start + chunk_size], z[start:start + chunk_size], allow_nonfinite=True)
    return stats


# ---------------------------------------------------------------------------------------
# Ridge from statistics


@dataclass
class LinearProbes:
    """K ridge probes z_k ~ x @ weight[:, k] + bias[k] (float64), with held-out scores.

    alpha (K,): the chosen ridge strength per target; alphas (L,): the grid searched;
    r2_grid (K, L): held-out R^2 of every (target, alpha); r2 (K,): at the chosen alpha;
    v_information (K,): the V-information of each target in `v_information_form` (module
    docstring): "r2" max(r2, 0), in units of Var z (the paper's fixed-variance form);
    "gaussian-nats" max(-1/2 log(1 - r2), 0) nats (learned variance). 0 for constant targets.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    alpha: torch.Tensor
    alphas: torch.Tensor
    r2: torch.Tensor
    r2_grid: torch.Tensor
    v_information: torch.Tensor
    n_train: int
    n_heldout: int
    v_information_form: str = "r2"

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N, K) float64 predictions."""
        check_tensor("x", x, ndim=2, shape_doc=f"(N, {self.weight.shape[0]})", dtypes=FLOAT_DTYPES)
        if x.shape[1] != self.weight.shape[0]:
            raise ValueError(f"x must have shape (N, {self.weight.shape[0]}), got shape {tuple(x.shape)}")
        w = self.weight.to(x.device)
        return torch.addmm(self.bias.to(x.device), x.to(w.dtype), w)


def _check_alphas(alphas, device) -> torch.Tensor:
    try:
        a = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"alphas must be a 1-D sequence of positive numbers, got {alphas!r}") from exc
    if a.numel() == 0:
        raise ValueError("alphas must hold at least one value, got an empty sequence")
    if not bool(torch.isfinite(a).all()) or bool((a <= 0).any()):
        raise ValueError(f"alphas must be finite and > 0 (the intercept-only and D > N cases need a ridge), "
                         f"got {a.tolist()}")
    return a.to(device)


def _tolerance(dtype: torch.dtype) -> float:
    # Rounding slack of float sums of squares relative to their magnitude.
    return 64 * torch.finfo(dtype).eps


def _group_sizes(D: int, K: int, L: int, max_bytes: int) -> tuple[int, int]:
    """(alphas per group, targets per block) so that two (g, D, kb) float64 arrays fit max_bytes."""
    per_unit = 2 * 8 * max(D, 1)
    units = max(1, max_bytes // per_unit)
    if units >= K:
        return max(1, min(L, units // K)), K
    return 1, units


def v_information_from_r2(r2: torch.Tensor, form: str = "r2") -> torch.Tensor:
    """V-information from held-out R^2 (module docstring): "r2" -> max(R^2, 0) (fixed variance,
    units of Var z); "gaussian-nats" -> max(-1/2 log(1 - R^2), 0) nats (learned variance)."""
    if form not in V_INFORMATION_FORMS:
        raise ValueError(f"v_information_form must be one of {V_INFORMATION_FORMS}, got {form!r}")
    r2 = r2.clamp_min(0)
    if form == "r2":
        return r2
    # 1 - R^2 is the held-out MSE over Var z; a perfect fit would be infinitely many nats.
    return (-0.5 * torch.log((1 - r2).clamp_min(torch.finfo(torch.float64).eps))).clamp_min(0)


def fit_linear_probes(train: ProbeStats, heldout: ProbeStats, alphas=None, *,
                      max_bytes: int = 1 << 30, v_information_form: str = "r2") -> LinearProbes:
    """Ridge probes with intercept for every target from train statistics, alpha chosen per
    target by held-out SSE, scored by held-out R^2 = 1 - SSE / SST (SST around the held-out mean).

    alphas: positive values (L,); None -> DEFAULT_ALPHA_FACTORS * trace(Xc^T Xc) / D, Xc the
    centered train features (1.0 instead of the trace term when the features are constant).
    One float64 eigendecomposition Xc^T Xc = V diag(e) V^T serves every alpha; in that basis
    the weights are c = V^T Xc^T zc / (e + alpha) and the held-out SSE of target k is
        sum z~^2 - 2 c^T V^T (sum x~ z~) + c^T (V^T sum x~ x~^T V) c,
    x~, z~ the held-out data centered at the train means. The quadratic form is evaluated for
    groups of (alpha, target) pairs sized to max_bytes (two float64 (D, group) arrays).

    Constant targets: held-out SST == 0 (up to rounding) gives r2 = 1.0 if SSE == 0 (up to
    rounding) else 0.0 (scikit-learn's r2_score force_finite); a constant train target gets
    weight 0 (intercept = its value). v_information is 0 for both; nothing is NaN.
    v_information_form: "r2" (default, the paper's fixed-variance form) or "gaussian-nats"
    (learned variance, -1/2 log(1 - R^2) nats); the probes and their R^2 are the same.
    """
    if not isinstance(train, ProbeStats):
        raise TypeError(f"train must be a ProbeStats, got {type(train).__name__}")
    if not isinstance(heldout, ProbeStats):
        raise TypeError(f"heldout must be a ProbeStats, got {type(heldout).__name__}")
    if (heldout.dim, heldout.num_targets) != (train.dim, train.num_targets):
        raise ValueError(f"heldout must have dim={train.dim}, num_targets={train.num_targets} like train, got "
                         f"dim={heldout.dim}, num_targets={heldout.num_targets}")
    if train.n < 1:
        raise ValueError("train must hold at least one sample, got n=0")
    if heldout.n < 1:
        raise ValueError("heldout must hold at least one sample, got n=0")
    check_int("max_bytes", max_bytes, 1)
    if v_information_form not in V_INFORMATION_FORMS:
        raise ValueError(f"v_information_form must be one of {V_INFORMATION_FORMS}, got {v_information_form!r}")
    device = train.device
    f64 = dict(dtype=torch.float64, device=device)
    D, K, n = train.dim, train.num_targets, float(train.n)

    # Centered train statistics (shift-invariant: the shift cancels in these differences).
    sx, sz = train.sum_x.to(**f64), train.sum_z.to(**f64)
    mean_x = train.shift_x.to(**f64) + sx / n
    mean_z = train.shift_z.to(**f64) + sz / n
    cxx = train.xx.to(copy=True, **f64).addr_(sx, sx, alpha=-1 / n)
    cxz = train.xz.to(copy=True, **f64).addr_(sx, sz, alpha=-1 / n)
    czz = train.sumsq_z.to(**f64) - sz * sz / n
    train_constant = czz <= _tolerance(train.dtype) * (train.sumsq_z.to(**f64) + sz * sz / n)

    alphas = (_default_alphas(cxx) if alphas is None else _check_alphas(alphas, device)).to(device)
    L = alphas.numel()

    evals, evecs = torch.linalg.eigh((cxx + cxx.mT) / 2)
    evals = evals.clamp_min(0)  # Xc^T Xc is PSD; negatives are rounding
    proj = evecs.mT @ cxz  # (D, K): V^T Xc^T zc
    proj[:, train_constant] = 0
    del cxz

    # Held-out statistics centered at the train means, rotated into the eigenbasis.
    h = heldout
    hxx, hxz, _, _, hzz = _to_device(h, device).moments(mean_x, mean_z)
    hxx_e = evecs.mT @ hxx @ evecs
    hxz_e = evecs.mT @ hxz
    del hxx, hxz
    hn = float(h.n)
    hsz, hsq = h.sum_z.to(**f64), h.sumsq_z.to(**f64)
    sst = (hsq - hsz * hsz / hn).clamp_min(0)
    heldout_constant = sst <= _tolerance(h.dtype) * (hsq + hsz * hsz / hn)

    # SSE (K, L) = hzz - 2 lin + quad.
    inv = 1 / (evals[:, None] + alphas[None, :])  # (D, L)
    lin = (proj * hxz_e).mT @ inv  # (K, L)
    quad = torch.empty((K, L), **f64)
    group, block = _group_sizes(D, K, L, max_bytes)
    for a0 in range(0, L, group):
        inv_g = inv[:, a0:a0 + group].mT[:, :, None]  # (g, D, 1)
        for k0 in range(0, K, block):
            coef = proj[None, :, k0:k0 + block] * inv_g  # (g, D, kb)
            hc = torch.matmul(hxx_e, coef).mul_(coef)
            quad[k0:k0 + block, a0:a0 + group] = hc.sum(1).mT
            del coef, hc
    sse = (hzz[:, None] - 2 * lin + quad).clamp_min(0)

    r2_grid = 1 - sse / torch.where(heldout_constant, 1.0, sst)[:, None]
    # "SSE == 0" is judged against the absolute held-out sum of z^2 (means that differ by
    # rounding must count as equal) plus the sum of z~^2.
    bz = h.shift_z.to(**f64)
    sse_scale = ((hsq + 2 * bz * hsz + hn * bz * bz).clamp_min(0) + hzz)[:, None]
    forced = torch.where(sse <= _tolerance(h.dtype) * sse_scale, 1.0, 0.0).to(torch.float64)
    r2_grid = torch.where(heldout_constant[:, None], forced, r2_grid)

    best = torch.argmin(sse, dim=1)  # first minimum: the smallest alpha index among exact ties
    alpha = alphas[best]
    r2 = r2_grid.gather(1, best[:, None])[:, 0]
    weight = evecs @ (proj / (evals[:, None] + alpha[None, :]))
    bias = mean_z - mean_x @ weight
    v_information = torch.where(heldout_constant | train_constant, 0.0,
                                v_information_from_r2(r2, v_information_form))
    return LinearProbes(weight=weight, bias=bias, alpha=alpha, alphas=alphas, r2=r2, r2_grid=r2_grid,
                        v_information=v_information, n_train=train.n, n_heldout=heldout.n,
                        v_information_form=v_information_form)


def _default_alphas(cxx: torch.Tensor) -> torch.Tensor:
    scale = float(torch.diagonal(cxx).sum()) / cxx.shape[0]
    if not (scale > 0 and math.isfinite(scale)):  # constant (or degenerate) features
        scale = 1.0
    return DEFAULT_ALPHA_FACTORS.to(cxx.device) * scale


def _to_device(stats: ProbeStats, device: torch.device) -> ProbeStats:
    if stats.device == device:
        return stats
    return ProbeStats.from_state_dict(stats.state_dict(), device=device, backend=stats.backend,
                                      precision=stats.precision)


def fit_probes(x_train: torch.Tensor, z_train: torch.Tensor, x_heldout: torch.Tensor, z_heldout: torch.Tensor,
               alphas=None, *, dtype: torch.dtype | None = None, backend: str = "auto", precision: str = "auto",
               chunk_size: int = 4096,
               max_bytes: int = 1 << 30, allow_nonfinite: bool = False,
               v_information_form: str = "r2") -> LinearProbes:
    """fit_linear_probes on in-memory train and held-out splits (statistics in dtype, None:
    float64 if any input is float64, else float32; precision: of their probe_stats)."""
    _check_pair(x_train, z_train, allow_nonfinite, "x_train", "z_train")
    _check_pair(x_heldout, z_heldout, allow_nonfinite, "x_heldout", "z_heldout")
    if x_heldout.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_heldout must have shape (N, {x_train.shape[1]}) like x_train, "
                         f"got shape {tuple(x_heldout.shape)}")
    if z_heldout.shape[1] != z_train.shape[1]:
        raise ValueError(f"z_heldout must have shape (N, {z_train.shape[1]}) like z_train, "
                         f"got shape {tuple(z_heldout.shape)}")
    dtype = dtype or _default_dtype(x_train, z_train, x_heldout, z_heldout)
    kw = dict(chunk_size=chunk_size, dtype=dtype, backend=backend, precision=precision, device=x_train.device,
              allow_nonfinite=True)
    train = accumulate_probe_stats(x_train, z_train, **kw)
    heldout = accumulate_probe_stats(x_heldout, z_heldout, **kw)
    return fit_linear_probes(train, heldout, alphas, max_bytes=max_bytes, v_information_form=v_information_form)
