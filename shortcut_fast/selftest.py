"""Self-test: every op on every backend usable here against its pure-PyTorch reference.

`run_selftest(device)` builds fresh random inputs of awkward shapes (sizes that are not a
multiple of a kernel block, a single element, an empty batch), runs each op through its
public function with an explicit `backend=` (so the dispatch table and argument handling
are exercised, not only the kernel), compares with the op's `*_reference`, and returns
one `Row` per check. Backends that cannot run on the device get one "unavailable" row
each, with the reason from shortcut_fast.backends. Nothing is printed or written.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shortcut_fast.backends import BackendUnavailable, backend_status, compiled_has_kernel
from shortcut_fast.ops import ablation, band_filter, class_spectrum, freq, probe_training
from shortcut_fast.ops.probe_stats import probe_stats, probe_stats_reference

# Per input dtype, for results computed in float32 (float64 for float64 input); the tests
# (tests/conftest.py) use the same table.
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-9),
    torch.float32: dict(rtol=2e-5, atol=1e-4),
    torch.float16: dict(rtol=2e-5, atol=1e-3),
    torch.bfloat16: dict(rtol=2e-5, atol=1e-3),
}

# torch is the reference itself: comparing it with itself proves nothing.
FAST_BACKENDS = ("cpp", "cuda", "triton")
STATUSES = ("pass", "FAIL", "skip", "unavailable")


@dataclass(frozen=True)
class Row:
    """One check. status: pass / FAIL / skip (the backend does not take this dtype) /
    unavailable (the backend cannot run on the device; op, dtype and shape are empty)."""

    op: str
    backend: str
    dtype: str
    shape: str
    max_abs_error: float | None
    atol: float | None
    rtol: float | None
    status: str
    detail: str = ""


@dataclass(frozen=True)
class OpSpec:
    """How to test one op: its public function (takes backend=), its reference (same
    positional arguments), the module attribute holding its dispatch table (looked up at
    run time, so a patched table is what gets tested), and its inputs per shape."""

    run: Callable
    reference: Callable
    table: tuple  # (module in shortcut_fast.ops, attribute) of its backend -> implementation dict
    shapes: Sequence[tuple]
    quick_shapes: Sequence[tuple]
    make: Callable  # (shape, dtype, generator) -> (positional args, keyword args, shape label)
    atol_scale: Callable = lambda args: 1.0  # reductions grow their float32 error with length
    # Passed to `run` only: the matmul-shaped kernels at their float32 products, which the
    # float32 tolerances are for (the other precisions: tests/test_precision.py).
    options: dict = dataclasses.field(default_factory=dict)


def _randn(g, *shape, dtype):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _randint(g, high, *shape):
    return torch.randint(0, max(high, 1), shape, generator=g)


def _images(shape, dtype, g):
    B, C, H, W = shape
    return _randn(g, B, C, H, W, dtype=dtype)


def _band_filter(shape, dtype, g):
    x = _images(shape, dtype, g)
    H, W = shape[-2:]
    weights = freq.symmetrize(torch.rand(3, H, W, generator=g) < 0.5)  # conjugate-symmetric, K = 3
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return (x, weights.to(compute)), {}, f"x {shape}, 3 masks"


def _remove_frequencies(shape, dtype, g):
    H, W = shape[-2:]
    freqs = torch.stack([_randint(g, H, 3), _randint(g, W, 3)], dim=1)
    return (_images(shape, dtype, g), freqs), {}, f"x {shape}, 3 pairs"


def _class_spectrum_sum(shape, dtype, g):
    return (_images(shape, dtype, g), _randint(g, 3, shape[0]), 3), {}, f"x {shape}, 3 classes"


def _probe_stats(shape, dtype, g):
    N, D, K = shape
    return (_randn(g, N, D, dtype=dtype), _randn(g, N, K, dtype=dtype)), {}, f"x ({N}, {D}), z ({N}, {K})"


def _channel_ablate(shape, dtype, g):
    P, C, S = shape
    act = _randn(g, P, C, S, dtype=dtype)
    mask = torch.rand(4, C, generator=g) < 0.4
    mask[0] = False  # the unmodified baseline row
    # alternate the two replacement forms: one value per channel, or a full activation
    full = (P + C + S) % 2 == 0
    rep = _randn(g, P, C, S, dtype=dtype) if full else _randn(g, C, dtype=dtype)
    return (act, mask, rep), {}, f"act {shape}, 4 masks, {'full' if full else 'per-channel'} replacement"


def _group_outcomes(shape, dtype, g):
    V, B, L = shape
    return ((_randn(g, V, B, L, dtype=dtype), _randint(g, L, B), _randint(g, 3, B), 3), {},
            f"logits {shape}, 3 groups")


def _probe_step(shape, dtype, g):
    family, N, D, K = shape
    x = _randn(g, N, D, dtype=dtype)
    if family == "softmax":
        C = 3
        weight, bias, log_var = _randn(g, K, D, C, dtype=dtype), _randn(g, K, C, dtype=dtype), None
        targets = _randint(g, C, N, K)
    else:
        weight, bias = _randn(g, K, D, dtype=dtype), _randn(g, K, dtype=dtype)
        log_var = _randn(g, K, dtype=dtype) if family == "gaussian" else None
        targets = _randn(g, N, K, dtype=dtype) if family == "gaussian" else _randint(g, 2, N, K)
    return (x, targets, weight, bias, log_var), {"family": family}, f"{family}, x ({N}, {D}), {K} probes"


def _probe_step_reference(x, targets, weight, bias, log_var, *, family):
    return probe_training.probe_step_reference(x, targets, weight, bias, log_var, family)


# Shapes: B/N/P sizes and image sides off every power of two, one element, an empty batch.
# The full run adds a size past the kernels' smallest blocks (16-64).
_IMAGE_QUICK = [(2, 3, 7, 5), (1, 1, 1, 1), (0, 2, 8, 8)]
_FLOAT32_PRODUCTS = {"precision": "ieee"}
OPS: dict[str, OpSpec] = {
    "band_filter": OpSpec(
        band_filter.band_filter, band_filter.band_filter_reference, ("band_filter", "_BAND_FILTER"),
        _IMAGE_QUICK + [(3, 2, 17, 12)], _IMAGE_QUICK, _band_filter,
        atol_scale=lambda args: max(1.0, 2e-2 * sum(args[0].shape[-2:])),  # the DFT sums H + W terms
        options=_FLOAT32_PRODUCTS),
    "remove_frequencies": OpSpec(
        band_filter.remove_frequencies, band_filter.remove_frequencies_reference,
        ("band_filter", "_REMOVE_FREQUENCIES"), _IMAGE_QUICK + [(3, 2, 17, 12)], _IMAGE_QUICK, _remove_frequencies,
        atol_scale=lambda args: max(1.0, 2e-2 * sum(args[0].shape[-2:]))),
    "class_spectrum_sum": OpSpec(
        class_spectrum.class_spectrum_sum, class_spectrum.class_spectrum_sum_reference,
        ("class_spectrum", "_CLASS_SPECTRUM_SUM"), _IMAGE_QUICK + [(5, 2, 17, 12)], _IMAGE_QUICK,
        _class_spectrum_sum, options=_FLOAT32_PRODUCTS),
    "probe_stats": OpSpec(
        probe_stats, probe_stats_reference, ("probe_stats", "_PROBE_STATS"),
        [(37, 5, 3), (1, 1, 1), (0, 4, 2), (70, 33, 17)], [(37, 5, 3), (1, 1, 1), (0, 4, 2)], _probe_stats,
        atol_scale=lambda args: math.sqrt(max(1, args[0].shape[0])),  # sums over N rows
        options=_FLOAT32_PRODUCTS),
    "channel_ablate": OpSpec(
        ablation.channel_ablate, ablation.channel_ablate_reference, ("ablation", "_CHANNEL_ABLATE"),
        [(3, 5, 7), (1, 1, 1), (0, 3, 5), (2, 37, 33)], [(3, 5, 7), (1, 1, 1), (0, 3, 5)], _channel_ablate),
    "group_outcomes": OpSpec(
        ablation.group_outcomes, ablation.group_outcomes_reference, ("ablation", "_GROUP_OUTCOMES"),
        [(2, 13, 5), (1, 1, 1), (2, 0, 4), (3, 70, 37)], [(2, 13, 5), (1, 1, 1), (2, 0, 4)], _group_outcomes),
    "probe_step": OpSpec(
        probe_training.probe_step, _probe_step_reference, ("probe_training", "_STEP"),
        [("softmax", 13, 5, 2), ("logistic", 13, 5, 2), ("gaussian", 13, 5, 2), ("softmax", 1, 1, 1),
         ("logistic", 0, 3, 2), ("gaussian", 70, 37, 3)],
        [("softmax", 13, 5, 2), ("logistic", 1, 1, 1), ("gaussian", 0, 3, 2)], _probe_step,
        atol_scale=lambda args: math.sqrt(max(1, args[0].shape[1])),  # each logit sums D products
        options=_FLOAT32_PRODUCTS),
}
DTYPES = (torch.float32, torch.float64)
QUICK_DTYPES = (torch.float32,)


def _tensors(out) -> list:
    """The tensors of an op's result, in order (None kept: a missing output is a mismatch)."""
    if isinstance(out, torch.Tensor) or out is None:
        return [out]
    return list(out)


def compare(got, want) -> tuple[float, str]:
    """(max |got - want| over every output tensor, mismatch reason): the reason says how
    the number or shapes of the outputs differ ("" when they match)."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return math.inf, f"{len(got)} outputs, the reference has {len(want)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, want)):
        if (a is None) != (b is None):
            return math.inf, f"output {i} is {'None' if a is None else 'a tensor'}, the reference's is not"
        if a is None:
            continue
        if tuple(a.shape) != tuple(b.shape):
            return math.inf, f"output {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}"
        if a.numel():
            worst = max(worst, float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()))
    return worst, ""


def within(got, want, atol: float, rtol: float) -> bool:
    """Every element satisfies |got - want| <= atol + rtol |want| (torch.testing's rule)."""
    for a, b in zip(_tensors(got), _tensors(want)):
        if a is None:
            continue
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        if not bool(((a - b).abs() <= atol + rtol * b.abs()).all()):  # NaN compares False: a failure
            return False
    return True


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _check(op: str, spec: OpSpec, backend: str, device: torch.device, dtype, shape, g) -> Row:
    args, kwargs, label = spec.make(shape, dtype, g)
    args = tuple(_to(a, device) for a in args)
    tol = TOLERANCES[dtype]
    atol, rtol = tol["atol"] * spec.atol_scale(args), tol["rtol"]
    row = dict(op=op, backend=backend, dtype=_dtype_name(dtype), shape=label, atol=atol, rtol=rtol)
    try:
        got = spec.run(*args, **kwargs, **spec.options, backend=backend)
    except BackendUnavailable as exc:  # e.g. triton on float64: not a fault of the kernel
        return Row(**row, max_abs_error=None, status="skip", detail=str(exc).split(" is unavailable: ", 1)[-1])
    except Exception as exc:  # a crashing backend is a failed check, reported like the others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Row(**row, max_abs_error=None, status="FAIL", detail=f"raised {type(exc).__name__}: {first}")
    want = spec.reference(*args, **kwargs)
    error, mismatch = compare(got, want)
    if mismatch:
        return Row(**row, max_abs_error=None, status="FAIL", detail=mismatch)
    ok = within(got, want, atol, rtol)
    return Row(**row, max_abs_error=error, status="pass" if ok else "FAIL",
               detail="" if ok else "error above atol + rtol * |reference|")


def run_selftest(device: torch.device | str = "cpu", *, quick: bool = False, seed: int = 0,
                 ops: Sequence[str] | None = None) -> list[Row]:
    """Check every op (or those named in `ops`) on every fast backend usable on `device`.

    quick: float32 only and the three awkward shapes (a smoke test in seconds); otherwise
    float64 too and one larger shape per op. seed: of the random inputs (each op draws from
    its own generator, so a subset reproduces the full run's inputs).
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {str(device)!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    names = list(OPS) if ops is None else list(ops)
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"ops must be names from {', '.join(OPS)}, got unknown {', '.join(map(repr, unknown))}")

    rows = []
    usable = []
    for backend in FAST_BACKENDS:
        status = backend_status(backend, device)
        if status:
            usable.append(backend)
        else:
            rows.append(Row("", backend, "", "", None, None, None, "unavailable", status.reason))
    dtypes = QUICK_DTYPES if quick else DTYPES
    for name in names:
        spec = OPS[name]
        module, attribute = spec.table
        # by module path: ops/__init__ re-exports a function named like the probe_stats module
        implemented = getattr(importlib.import_module(f"shortcut_fast.ops.{module}"), attribute)
        for backend in usable:
            if backend not in implemented:
                continue  # e.g. probe_step has no compiled op (its matmuls already run in MKL/cuBLAS)
            if backend in ("cpp", "cuda") and not compiled_has_kernel(name, backend):
                rows.append(Row(name, backend, "", "", None, None, None, "FAIL",
                                f"the compiled extension has no {name} kernel for {device.type} (rebuild it)"))
                continue
            # one generator per (op, backend): every backend of an op sees the same inputs
            g = torch.Generator().manual_seed(seed * 1000 + list(OPS).index(name))
            for dtype in dtypes:
                for shape in (spec.quick_shapes if quick else spec.shapes):
                    row = _check(name, spec, backend, device, dtype, shape, g)
                    if row.status == "skip":  # the dtype is refused whatever the shape: one row says so
                        rows.append(dataclasses.replace(row, shape="any", max_abs_error=None))
                        break
                    rows.append(row)
    return rows


def failures(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.status == "FAIL"]
