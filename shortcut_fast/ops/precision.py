"""Precision of the matmul-shaped kernels: its names, the error each may make, the default.

The triton kernels of band_filter, class_spectrum_sum, probe_stats and probe_step compute
their sums of products with tl.dot (kernels/_dot.py); `precision` names the operands those
products read, and every precision accumulates in float32:
  ieee    float32 operands on the FMA units (no tensor cores): float32 rounding only.
  tf32x3  each operand split into a tf32 part and a tf32 remainder, three tensor-core products:
          about float32 accuracy.
  tf32    operands as the tensor cores read float32: 10 mantissa bits (the low 13 dropped).
  bf16    operands rounded to bfloat16: 7 mantissa bits.
  auto    on a GPU, the fastest precision whose tolerance (TOLERANCES) is within what the op's
          results need (REQUIRED): AUTO per op. Anywhere else "ieee".

Only the triton kernels have precisions. The other backends compute in their dtype whatever
the precision: torch (float32/float64 FFTs and matmuls; on a GPU its float32 matmuls follow
torch.backends.cuda.matmul.allow_tf32, off by default), cpp (float32/float64) and cuda
(cuFFT and float32 products; the extension has no reduced-precision variant). Their results
are within every precision's tolerance, so they accept any precision and ignore it.

Error: max |result - float64 reference| over an output, divided by the output's scale
(`error`, per op):
  band_filter          the input images' peak, max |x| (an error in units of the pixel range)
  class_spectrum_sum   the largest class sum of |fft2(x)|
  probe_stats          the same statistic over |x| and |z| (sum |x_i| |z_j| for x^T z, sum |x|
                       for sum x...): the bound of a sum's rounding error, which does not
                       shrink when the terms cancel (centred data)
  probe_step           likewise the mean over samples of |term|: |x|^T |R| / N for the weight
                       gradient (R the loss's gradient in the logits), mean |R| for the bias,
                       mean |per-sample loss| and mean |d loss / d log_var|
TOLERANCES bounds that error per op and precision: design constants from the rounding of the
operands, with room for float32 accumulation. A tf32 operand loses up to 2^-10 of itself (its
low bits dropped), a bf16 one up to 2^-9 (rounded to nearest), so one product of two is
off by up to 2^-9 (tf32) or 2^-8 (bf16) of itself, and a sum of them by as much of the sum of
|terms|: probe_stats, one product per sum, gets twice that. The DFT kernels chain three
roundings (image spectrum, first stage, second stage) and probe_step two products (logits,
then gradient) and a nonlinear loss in between: they get 2^-8 (tf32) and 2^-6 (bf16). ieee and
tf32x3 make float32 rounding errors only: 1e-5. bench/precision.py measures the errors at the
benchmark sizes; tests/test_precision.py checks every op and precision against the table.
"""
from __future__ import annotations

import torch

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
PRECISION_CHOICES = ("auto", *PRECISIONS)
# By the tensor cores' dense peak (bench/roofline.py PEAKS, H100: bf16 989, tf32 495 TFLOP/s;
# tf32x3 three tf32 products; ieee the 67 TFLOP/s of the FMA units).
FASTEST_FIRST = ("bf16", "tf32", "tf32x3", "ieee")
OPS = ("band_filter", "class_spectrum_sum", "probe_stats", "probe_step")

# op -> precision -> the largest error (module docstring) the kernel may make.
TOLERANCES: dict[str, dict[str, float]] = {
    "band_filter": {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2 ** -8, "bf16": 2 ** -6},
    "class_spectrum_sum": {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2 ** -8, "bf16": 2 ** -6},
    "probe_stats": {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2 ** -8, "bf16": 2 ** -7},
    "probe_step": {"ieee": 1e-5, "tf32x3": 1e-5, "tf32": 2 ** -8, "bf16": 2 ** -6},
}

# op -> the error its results can take (why, below); AUTO picks within it.
REQUIRED: dict[str, float] = {
    # Filtered images feed a model. Images come as 8-bit pixels: an error under half a level
    # of their range (1/510) is below the data's own resolution. tf32 can lose three times
    # 2^-10 of a bright image (tolerance 2^-8): too much.
    "band_filter": 1 / 510,
    # Class sums feed the class means that ADCS compares frequency by frequency: the same
    # half 8-bit level of the largest sum.
    "class_spectrum_sum": 1 / 510,
    # Ridge probes from the statistics: held-out R^2 is a difference of sums (SSE against
    # SST), checked against scikit-learn to 1e-4 (bench/probe_stats.py): float32 accuracy.
    "probe_stats": 1e-5,
    # Gradients of one Adam step on a minibatch: their own sampling noise is about
    # 1/sqrt(batch) of their scale, 2^-5 at train_probes' default batch of 1,024; half of it.
    # The probes are scored by a float32 evaluation (evaluate_probes) whatever the precision.
    "probe_step": 2 ** -6,
}


def _auto(op: str) -> str:
    return next(p for p in FASTEST_FIRST if TOLERANCES[op][p] <= REQUIRED[op])


# op -> what "auto" means on a GPU.
AUTO: dict[str, str] = {op: _auto(op) for op in OPS}


def check_precision(precision) -> None:
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {PRECISION_CHOICES}, got {precision!r}")


def resolve(op: str, precision: str, device: torch.device | str) -> str:
    """The precision `precision` means for `op` on tensors of `device`: itself, or for "auto"
    the op's AUTO on a GPU and "ieee" elsewhere (the interpreter and the CPU backends)."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return AUTO[op] if torch.device(device).type == "cuda" else "ieee"


def ignores_precision(impl):
    """A backend without precisions in a dispatch table whose calls pass one: impl without it."""
    def run(*args):
        return impl(*args[:-1])

    run.__name__ = getattr(impl, "__name__", "run")
    return run


# ---------------------------------------------------------------------------------------
# The error of a result (module docstring), for the tests and bench/precision.py


def _max_error(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor | float) -> float:
    if got.numel() == 0:
        return 0.0
    err = float((got.detach().double().cpu() - want.cpu()).abs().max())
    scale = float(scale)
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale


def error(op: str, got, *inputs, **options) -> float:
    """The error of `got`, op's result on `inputs` (its public function's positional
    arguments; options: family= of probe_step, mode= of band_filter), against the float64
    reference, over every output."""
    from shortcut_fast.ops import band_filter, class_spectrum, probe_training
    from shortcut_fast.ops.probe_stats import probe_stats_reference

    f64 = [t.double().cpu() if isinstance(t, torch.Tensor) and t.is_floating_point() else
           (t.cpu() if isinstance(t, torch.Tensor) else t) for t in inputs]
    if op == "band_filter":
        x, masks = f64
        H, W = x.shape[-2:]
        weights = band_filter.prepare_masks(masks, H, W, options.get("mode", "pass"), dtype=torch.float64)
        return _max_error(got, band_filter.band_filter_reference(x, weights), x.abs().max() if x.numel() else 0)
    if op == "class_spectrum_sum":
        want = class_spectrum.class_spectrum_sum_reference(*f64)
        return _max_error(got, want, want.abs().max() if want.numel() else 0)
    if op == "probe_stats":
        x, z = f64
        wants = probe_stats_reference(x, z)
        bounds = probe_stats_reference(x.abs(), z.abs())
        return max(_max_error(g, w, b.max() if b.numel() else 0) for g, w, b in zip(got, wants, bounds))
    if op == "probe_step":
        x, targets, weight, bias, log_var = f64
        family = options["family"]
        want = probe_training.probe_step_reference(x, targets, weight, bias, log_var, family)
        bounds = probe_training.probe_step_bounds(x, targets, weight, bias, log_var, family)
        return max(_max_error(g, w, b.max() if b.numel() else 0)
                   for g, w, b in zip(got, want, bounds) if g is not None)
    raise ValueError(f"op must be one of {OPS}, got {op!r}")
