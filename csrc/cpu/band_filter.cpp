// CPU kernels of band_filter and remove_frequencies.
//
// band_filter: one real FFT of the images (ATen: MKL or pocketfft), then, for chunks of
// masks sized to a small cache-friendly budget, a fused multiply of the half spectrum by
// the half weights (the first W/2+1 columns; the weights are conjugate-symmetric, so the
// product stays Hermitian) and one batched inverse real FFT per chunk, written into the
// output. Half the work of the full complex round trip of the reference, and no
// temporaries the size of the output.
//
// remove_frequencies: a rank-one update per (mask, image, channel). F(u, v) comes from one
// real FFT of the images (Hermitian symmetry for v >= W/2+1); the output is then
//     x - Re(coef * exp(2 pi i (u y / H + v x / W))),  coef = c F(u, v) / (H W)
// with separable phase tables per mask: row phase exp(2 pi i (u y mod H) / H) and column
// phase exp(2 pi i (v x mod W) / W), the integer reduction keeping the phase exact.
// OpenMP over output planes: each thread writes whole planes, deterministic.
#include <torch/extension.h>
#include <ATen/ThreadLocalState.h>
#include <algorithm>
#include <cmath>
#include <complex>
#include <vector>
#include "../checks.h"

namespace shortcut_fast {
namespace {

// Budget for the temporary masked half spectra of one chunk of masks. Small on purpose:
// the buffer is reused chunk after chunk while it is still in cache (and its pages are
// mapped once); large temporaries made the CPU path slower than the reference.
constexpr int64_t kChunkBytes = int64_t(4) << 20;

// buf[k - k0, bc, u, v] = half[bc, u, v] * weights[k, u, v] for v < W/2+1. Parallel over
// rows when called outside a parallel region; inline (serial) when nested in one.
template <typename scalar_t>
void mask_half_spectra(const at::Tensor& half, const at::Tensor& weights, int64_t k0, at::Tensor& buf) {
  using complex_t = std::complex<scalar_t>;
  const int64_t kc = buf.size(0), BC = half.size(0) * half.size(1), H = half.size(2), Wh = half.size(3);
  const int64_t W = weights.size(2);
  const auto* spec = reinterpret_cast<const complex_t*>(half.data_ptr());
  const scalar_t* w = weights.data_ptr<scalar_t>() + k0 * H * W;
  auto* dst = reinterpret_cast<complex_t*>(buf.data_ptr());
  const int64_t grain = std::max<int64_t>(1, 8192 / Wh);
  at::parallel_for(0, kc * BC * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {  // row = (k * BC + bc) * H + u
      const int64_t u = row % H;
      const int64_t k = row / (BC * H);
      const int64_t bc = row / H - k * BC;
      const complex_t* s = spec + (bc * H + u) * Wh;
      const scalar_t* wr = w + (k * H + u) * W;
      complex_t* d = dst + row * Wh;
      for (int64_t v = 0; v < Wh; ++v) d[v] = s[v] * wr[v];
    }
  });
}

at::Tensor band_filter_cpu(const at::Tensor& x, const at::Tensor& weights) {
  check_band_filter_args(x, weights);
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weights.size(0);
  if (K == 0 || B == 0 || C == 0 || H == 0 || W == 0) return at::zeros({K, B, C, H, W}, x.options().dtype(dtype));

  auto half = at::fft_rfft2(x.to(dtype)).contiguous();  // (B, C, H, Wh) complex
  auto w = weights.to(dtype).contiguous();
  const int64_t Wh = half.size(3);
  const int64_t complex_bytes = 2 * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t per_mask = B * C * H * Wh * complex_bytes;
  const int64_t chunk = std::min<int64_t>(K, std::max<int64_t>(1, kChunkBytes / per_mask));
  const int64_t n_chunks = (K + chunk - 1) / chunk;
  if (n_chunks == 1) {  // small problem: one multiply and one inverse FFT, no copy
    at::Tensor buf = at::empty({K, B, C, H, Wh}, half.options());
    AT_DISPATCH_FLOATING_TYPES(dtype, "band_filter_cpu", [&] { mask_half_spectra<scalar_t>(half, w, 0, buf); });
    return at::fft_irfft2(buf, at::IntArrayRef{H, W}, {-2, -1});
  }

  auto out = at::empty({K, B, C, H, W}, x.options().dtype(dtype));
  // One parallel region over chunks; each thread reuses its own small buffer and runs its
  // inverse FFTs serially (nested in the region), instead of a threaded FFT per chunk.
  const at::ThreadLocalState tls;
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard tls_guard(tls);  // ATen ops inside a parallel region
    at::Tensor buf = at::empty({chunk, B, C, H, Wh}, half.options());
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t k0 = c * chunk, kc = std::min(chunk, K - k0);
      at::Tensor part = buf.narrow(0, 0, kc);
      AT_DISPATCH_FLOATING_TYPES(dtype, "band_filter_cpu", [&] { mask_half_spectra<scalar_t>(half, w, k0, part); });
      at::Tensor dst = out.narrow(0, k0, kc);
      at::fft_irfft2_out(dst, part, at::IntArrayRef{H, W}, {-2, -1});
    }
  });
  return out;
}

// Gathers F(u, v) of every (image, channel) from the half spectrum and scales it by
// c / (H W): coef[k][bc] for k < K.
template <typename scalar_t>
std::vector<std::complex<scalar_t>> pair_coefficients(const at::Tensor& half, const std::vector<int64_t>& us,
                                                      const std::vector<int64_t>& vs, int64_t W) {
  using complex_t = std::complex<scalar_t>;
  const int64_t K = static_cast<int64_t>(us.size());
  const int64_t BC = half.size(0) * half.size(1), H = half.size(2), Wh = half.size(3);
  const auto* spec = reinterpret_cast<const complex_t*>(half.data_ptr());
  std::vector<complex_t> coef(K * BC);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t u = us[k], v = vs[k];
    const int64_t u_mirror = (H - u) % H, v_mirror = (W - v) % W;
    const bool self_conjugate = u == u_mirror && v == v_mirror;
    const scalar_t scale = static_cast<scalar_t>((self_conjugate ? 1.0 : 2.0) / (static_cast<double>(H) * W));
    for (int64_t bc = 0; bc < BC; ++bc) {
      // Columns past the half spectrum: F(u, v) = conj(F(-u, W - v)).
      const complex_t f = v < Wh ? spec[(bc * H + u) * Wh + v] : std::conj(spec[(bc * H + u_mirror) * Wh + v_mirror]);
      coef[k * BC + bc] = f * scale;
    }
  }
  return coef;
}

// cos and sin of 2 pi (f * i mod n) / n for i in [0, n), computed in double.
template <typename scalar_t>
void phase_table(int64_t f, int64_t n, scalar_t* cos_out, scalar_t* sin_out) {
  const double two_pi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t m = (f * i) % n;  // f, i < n: no overflow for any realistic image
    const double angle = two_pi * static_cast<double>(m) / static_cast<double>(n);
    cos_out[i] = static_cast<scalar_t>(std::cos(angle));
    sin_out[i] = static_cast<scalar_t>(std::sin(angle));
  }
}

template <typename scalar_t>
void remove_pairs_cpu(const at::Tensor& xc, const at::Tensor& half, const std::vector<int64_t>& us,
                      const std::vector<int64_t>& vs, at::Tensor& out) {
  using complex_t = std::complex<scalar_t>;
  const int64_t K = static_cast<int64_t>(us.size());
  const int64_t BC = xc.size(0) * xc.size(1), H = xc.size(2), W = xc.size(3);
  const auto coef = pair_coefficients<scalar_t>(half, us, vs, W);
  // Per mask: row table (cos, sin) of length H, column table (cos, sin) of length W.
  std::vector<scalar_t> row_cos(K * H), row_sin(K * H), col_cos(K * W), col_sin(K * W);
  for (int64_t k = 0; k < K; ++k) {
    phase_table<scalar_t>(us[k], H, row_cos.data() + k * H, row_sin.data() + k * H);
    phase_table<scalar_t>(vs[k], W, col_cos.data() + k * W, col_sin.data() + k * W);
  }
  const scalar_t* src = xc.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t plane = H * W;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, K * BC, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p / BC, bc = p % BC;
      const complex_t c = coef[p];  // p == k * BC + bc
      const scalar_t* rc = row_cos.data() + k * H;
      const scalar_t* rs = row_sin.data() + k * H;
      const scalar_t* cc = col_cos.data() + k * W;
      const scalar_t* cs = col_sin.data() + k * W;
      const scalar_t* xin = src + bc * plane;
      scalar_t* o = dst + p * plane;
      for (int64_t y = 0; y < H; ++y) {
        // g = coef * exp(i row phase); the pixel value is Re(g * exp(i column phase)).
        const scalar_t gr = c.real() * rc[y] - c.imag() * rs[y];
        const scalar_t gi = c.real() * rs[y] + c.imag() * rc[y];
        const scalar_t* xr = xin + y * W;
        scalar_t* orow = o + y * W;
        for (int64_t j = 0; j < W; ++j) orow[j] = xr[j] - (gr * cc[j] - gi * cs[j]);
      }
    }
  });
}

at::Tensor remove_frequencies_cpu(const at::Tensor& x, const at::Tensor& freqs) {
  check_remove_frequencies_args(x, freqs);
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = freqs.size(0);
  if (K == 0 || B == 0 || C == 0 || H == 0 || W == 0) return at::zeros({K, B, C, H, W}, x.options().dtype(dtype));

  auto fr = freqs.contiguous();
  const int64_t* f = fr.data_ptr<int64_t>();
  std::vector<int64_t> us(K), vs(K);
  for (int64_t k = 0; k < K; ++k) {  // the fft2 grid is periodic: reduce modulo (H, W)
    us[k] = ((f[2 * k] % H) + H) % H;
    vs[k] = ((f[2 * k + 1] % W) + W) % W;
  }
  auto xc = x.to(dtype).contiguous();
  auto half = at::fft_rfft2(xc).contiguous();  // (B, C, H, W/2+1) complex
  auto out = at::empty({K, B, C, H, W}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "remove_frequencies_cpu",
                             [&] { remove_pairs_cpu<scalar_t>(xc, half, us, vs, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CPU, m) {
  m.impl("band_filter", &band_filter_cpu);
  m.impl("remove_frequencies", &remove_frequencies_cpu);
}

}  // namespace shortcut_fast
