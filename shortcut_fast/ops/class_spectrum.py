"""Class-wise amplitude spectra (docs/experiments.md#frequency-shortcuts).

E_c(u, v) = mean over images of class c of |fft2(x)(u, v)|, per channel, on the unshifted
torch.fft.fft2 grid. `class_spectrum_sum` is the streaming reduction behind it (sums, so
batches can be added); `ClassSpectrum` accumulates a stream; `adcs` turns class means into
the ADCS maps of Wang et al. (ICCV 2023).

precision (shortcut_fast.ops.precision): the triton kernel's DFT is written as matmuls whose
products run at the precision asked for ("auto": AUTO["class_spectrum_sum"] on a GPU, "ieee"
elsewhere); the other backends are exact in their dtype (precision ignored).
"""
from __future__ import annotations

import torch

from shortcut_fast.backends import compiled_op, define_op, dispatch, triton_kernel
from shortcut_fast.ops._checks import FLOAT_DTYPES, check_finite, check_labels, check_tensor
from shortcut_fast.ops.precision import check_precision, ignores_precision, resolve


def class_spectrum_sum_reference(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pure-PyTorch ground truth: sum of |fft2(x)| over the images of each class."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros((num_classes, *x.shape[1:]), dtype=dtype, device=x.device)
    if x.numel() == 0:  # the FFT libraries reject empty transforms
        return out
    magnitude = torch.fft.fft2(x.to(dtype)).abs()
    return out.index_add_(0, labels, magnitude)


def class_spectrum_sum(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    backend: str = "auto",
    precision: str = "auto",
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Sum over images of |fft2(x)| per class and channel.

    x: (B, C, H, W) float16/bfloat16/float32/float64 images; labels: (B,) int64 in
    [0, num_classes). Returns (num_classes, C, H, W), float32 (float64 for float64 input);
    math is float32 (float64) whatever the input dtype. precision: of the triton kernel's
    products (module docstring).
    """
    check_tensor("x", x, ndim=4, shape_doc="(B, C, H, W)", dtypes=FLOAT_DTYPES)
    precision = resolve("class_spectrum_sum", precision, x.device)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    check_labels("labels", labels, x.shape[0], num_classes, x.device)
    if not allow_nonfinite:
        check_finite("x", x)
    unsupported = {}
    if x.dtype == torch.float64:
        unsupported["triton"] = "the triton kernel computes in float32; float64 input needs torch/cpp/cuda"
    run = dispatch("class_spectrum_sum", backend, x.device, _CLASS_SPECTRUM_SUM, unsupported=unsupported)
    return run(x.contiguous(), labels.contiguous(), num_classes, precision)


# Sum over images of |fft2(x)|, per label and channel: x (B,C,H,W), labels (B,) -> (K,C,H,W),
# float64 for float64 x, else float32.
@define_op("class_spectrum_sum(Tensor x, Tensor labels, int num_classes) -> Tensor")
def _class_spectrum_sum_fake(x, labels, num_classes):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((num_classes, *x.shape[1:]), dtype=dtype)


# auto (backends.DEFAULT_AUTO_ORDER): on the CPU the C++ kernel (half spectrum, fused
# reduction) beats the reference; on the GPU the cuFFT path beats the matmul DFT of the
# Triton kernel except for tiny images.
# Every implementation takes (x, labels, num_classes, precision); only triton has precisions.
_CLASS_SPECTRUM_SUM = {
    "torch": ignores_precision(class_spectrum_sum_reference),
    "cpp": ignores_precision(compiled_op("class_spectrum_sum")),
    "cuda": ignores_precision(compiled_op("class_spectrum_sum")),
    "triton": triton_kernel("class_spectrum", "class_spectrum_sum_triton"),
}


class ClassSpectrum:
    """Streaming mean amplitude spectrum per class: call `update` per batch, then `mean()`."""

    def __init__(self, num_classes: int, *, backend: str = "auto", precision: str = "auto"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        check_precision(precision)
        self.num_classes = num_classes
        self.backend = backend
        self.precision = precision
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, x: torch.Tensor, labels: torch.Tensor) -> "ClassSpectrum":
        batch = class_spectrum_sum(x, labels, self.num_classes, backend=self.backend, precision=self.precision)
        if self.sums is None:
            self.sums = batch
        else:
            if batch.shape != self.sums.shape:
                raise ValueError(
                    f"x must have per-image shape {tuple(self.sums.shape[1:])} like earlier batches, "
                    f"got {tuple(x.shape[1:])}"
                )
            self.sums += batch.to(self.sums.device)
        self.counts += torch.bincount(labels.cpu(), minlength=self.num_classes)
        return self

    def mean(self) -> torch.Tensor:
        """(num_classes, C, H, W) mean |FFT|; classes never seen are NaN (not silently 0)."""
        if self.sums is None:
            raise RuntimeError("ClassSpectrum.mean() called before any update()")
        counts = self.counts.to(self.sums.device, self.sums.dtype).view(-1, 1, 1, 1)
        return self.sums / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def _check_class_means(class_means: torch.Tensor) -> None:
    """ADCS compares every class with every other: one missing class would turn every sign
    against it into 0 (NaN compares false) and shift all the maps silently."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(class_means.flatten(1))
    if not bool(bad.any()):
        return
    absent = bad.all(dim=1).nonzero().flatten().tolist()
    if absent and not bool(bad[~bad.all(dim=1)].any()):
        raise ValueError(f"class_means has no data for class(es) {absent} (their rows are all NaN, as "
                         f"ClassSpectrum.mean() gives for classes never seen); ADCS compares every pair of "
                         f"classes, so feed images of every class, or pass only the rows of classes present")
    rows = bad.any(dim=1).nonzero().flatten().tolist()
    raise ValueError(f"class_means contains {int(bad.sum())} NaN/Inf values (in the rows of class(es) {rows}); "
                     f"ADCS needs finite class means")


def adcs(class_means: torch.Tensor) -> torch.Tensor:
    """ADCS_c(u, v) = sum over j != c of sign(E_c(u, v) - E_j(u, v)), E averaged over channels.

    class_means: (K, C, H, W) or (K, H, W), finite. Returns int64 (K, H, W) in [1 - K, K - 1].
    A class without data (an all-NaN row, as ClassSpectrum.mean() gives for classes never
    seen) raises ValueError naming it: its ADCS is undefined, and it would shift the others.
    """
    check_tensor("class_means", class_means, dtypes=FLOAT_DTYPES)
    if class_means.dim() not in (3, 4):
        raise ValueError(f"class_means must have shape (K, C, H, W) or (K, H, W), got {tuple(class_means.shape)}")
    _check_class_means(class_means)
    if class_means.dim() == 4:
        class_means = class_means.mean(dim=1)
    # sign(E_c - E_c) = 0, so summing over all j equals summing over j != c.
    diff = class_means[:, None] - class_means[None, :]
    return torch.sign(diff).sum(dim=1).to(torch.int64)
