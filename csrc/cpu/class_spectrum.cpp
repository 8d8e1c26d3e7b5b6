// CPU kernel of class_spectrum_sum: one real FFT per image (ATen's pocketfft/MKL), then
// a fused |.| + per-class reduction that reads the half spectrum once and uses the
// Hermitian symmetry |F(u,v)| = |F(-u,-v)| to fill the full grid. OpenMP over
// (channel, row) pairs: each thread owns its output rows, so the result is deterministic.
#include <torch/extension.h>
#include <complex>
#include "../checks.h"

namespace shortcut_fast {
namespace {

template <typename scalar_t>
void reduce_cpu(const at::Tensor& half, const at::Tensor& labels, at::Tensor& out) {
  const int64_t B = half.size(0), C = half.size(1), H = half.size(2), Wh = half.size(3);
  const int64_t W = out.size(3);
  const auto* spec = reinterpret_cast<const std::complex<scalar_t>*>(half.data_ptr());
  const int64_t* lab = labels.data_ptr<int64_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t K = out.size(0);

  at::parallel_for(0, C * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cu = begin; cu < end; ++cu) {
      const int64_t c = cu / H, u = cu % H;
      const int64_t u_mirror = (H - u) % H;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k = lab[b];
        if (k < 0 || k >= K) continue;  // validated in Python; never write out of bounds
        scalar_t* row = dst + ((k * C + c) * H + u) * W;
        const std::complex<scalar_t>* src = spec + ((b * C + c) * H + u) * Wh;
        const std::complex<scalar_t>* src_mirror = spec + ((b * C + c) * H + u_mirror) * Wh;
        for (int64_t v = 0; v < Wh; ++v) row[v] += std::abs(src[v]);
        // Columns past the half spectrum: F(u, v) = conj(F(-u, W - v)).
        for (int64_t v = Wh; v < W; ++v) row[v] += std::abs(src_mirror[W - v]);
      }
    }
  });
}

at::Tensor class_spectrum_sum_cpu(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  check_class_spectrum_args(x, labels, num_classes);
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::zeros({num_classes, C, H, W}, x.options().dtype(dtype));
  if (B == 0 || H == 0 || W == 0) return out;
  auto half = at::fft_rfft2(x.to(dtype)).contiguous();
  auto lab = labels.contiguous();
  AT_DISPATCH_FLOATING_TYPES(dtype, "class_spectrum_sum_cpu", [&] { reduce_cpu<scalar_t>(half, lab, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CPU, m) { m.impl("class_spectrum_sum", &class_spectrum_sum_cpu); }

}  // namespace shortcut_fast
