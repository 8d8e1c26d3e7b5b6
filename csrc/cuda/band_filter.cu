// CUDA kernels of band_filter and remove_frequencies.
//
// band_filter: one batched real FFT of the images (cuFFT through ATen); then, for chunks
// of masks, a kernel writes the masked half spectra (half spectrum times the first W/2+1
// columns of each weight; the weights are conjugate-symmetric, so the products stay
// Hermitian; the 1/(H W) of the inverse is folded in) and one batched inverse real FFT
// per chunk (unnormalized) produces the filtered images.
//
// remove_frequencies: a rank-one update per (mask, image, channel),
//     out = x - Re(coef * exp(2 pi i (u y / H + v x / W))),  coef = c F(u, v) / (H W),
// c = 2 for a genuine conjugate pair, 1 for a self-conjugate frequency. A small kernel
// gathers the coefficients (K, B*C) from one real FFT of the images (Hermitian symmetry
// for v >= W/2+1) and builds per-mask phase tables exp(2 pi i (u y mod H) / H) (rows) and
// exp(2 pi i (v x mod W) / W) (columns) with the integer reduction done before sincospi,
// in double. The main kernel is memory bound: each block owns one contiguous range of
// one mask's output slab; consecutive blocks are the K masks of the same image range, so
// x is read from L2; stores are 16-byte vectors (streaming) where alignment allows.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <algorithm>
#include <cstdint>
#include <limits>
#include "../checks.h"

namespace shortcut_fast {
namespace {

constexpr int kThreads = 256;
// Masked half spectra per chunk of masks (the inverse FFT needs about three times this).
constexpr int64_t kChunkBytes = int64_t(512) << 20;
// Output elements per block of the remove_frequencies kernel (a multiple of every VEC).
constexpr int32_t kElemsPerBlock = 8192;

template <typename T>
struct Vec2;
template <>
struct Vec2<float> {
  using type = float2;
};
template <>
struct Vec2<double> {
  using type = double2;
};

// Unsigned division by a runtime constant with a multiply and a shift (the round-up
// method, as in Hacker's Delight): exact for divisors in [1, 2^31] and numerators < 2^31.
struct FastDivmod {
  uint32_t divisor = 1, multiplier = 1, shift = 0;
  FastDivmod() = default;
  explicit FastDivmod(uint32_t d) : divisor(d) {
    TORCH_CHECK(d >= 1 && d <= (uint32_t(1) << 31), "FastDivmod: divisor out of range: ", d);
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, multiplier) + n) >> shift; }
};

__host__ __device__ __forceinline__ int64_t wrap_index(int64_t f, int64_t n) { return ((f % n) + n) % n; }

// ----------------------------------------------------------------------------- band_filter

// buf[k, bc, u, v] = half[bc, u, v] * weights[k, u, v] * scale for v < Wh; one mask per
// blockIdx.y. scale = 1/(H W) folds the inverse FFT's normalization into this pass.
template <typename scalar_t, bool kFast>
__global__ void __launch_bounds__(kThreads)
    mask_half_spectra_kernel(const typename Vec2<scalar_t>::type* __restrict__ half,
                             const scalar_t* __restrict__ weights, typename Vec2<scalar_t>::type* __restrict__ buf,
                             int64_t n, int64_t H, int64_t W, int64_t Wh, scalar_t scale, FastDivmod div_hwh,
                             FastDivmod div_wh) {
  using vec2_t = typename Vec2<scalar_t>::type;
  const int64_t kl = blockIdx.y;
  const scalar_t* w = weights + kl * H * W;
  vec2_t* dst = buf + kl * n;
  const int64_t HWh = H * Wh;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += stride) {
    int64_t u, v;
    if constexpr (kFast) {  // n < 2^31
      const uint32_t i = static_cast<uint32_t>(idx);
      const uint32_t e = i - div_hwh.div(i) * static_cast<uint32_t>(HWh);
      const uint32_t uu = div_wh.div(e);
      u = uu;
      v = e - uu * static_cast<uint32_t>(Wh);
    } else {
      const int64_t e = idx % HWh;
      u = e / Wh;
      v = e - u * Wh;
    }
    const vec2_t s = half[idx];
    const scalar_t m = w[u * W + v] * scale;
    vec2_t out;
    out.x = s.x * m;
    out.y = s.y * m;
    dst[idx] = out;
  }
}

template <typename scalar_t>
void launch_mask_half_spectra(const at::Tensor& half, const at::Tensor& weights, int64_t k0, at::Tensor& part,
                              cudaStream_t stream) {
  using vec2_t = typename Vec2<scalar_t>::type;
  const int64_t kc = part.size(0), H = half.size(2), Wh = half.size(3), W = weights.size(2);
  const int64_t n = half.numel();  // B * C * H * Wh complex values per mask
  const bool fast = n < (int64_t(1) << 31);
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(kc));
  const auto* src = reinterpret_cast<const vec2_t*>(half.data_ptr());
  const scalar_t* w = weights.data_ptr<scalar_t>() + k0 * H * W;
  auto* dst = reinterpret_cast<vec2_t*>(part.data_ptr());
  const scalar_t scale = static_cast<scalar_t>(1.0 / (static_cast<double>(H) * static_cast<double>(W)));
  if (fast) {
    const FastDivmod div_hwh(static_cast<uint32_t>(H * Wh)), div_wh(static_cast<uint32_t>(Wh));
    mask_half_spectra_kernel<scalar_t, true><<<grid, kThreads, 0, stream>>>(src, w, dst, n, H, W, Wh, scale, div_hwh,
                                                                            div_wh);
  } else {
    mask_half_spectra_kernel<scalar_t, false><<<grid, kThreads, 0, stream>>>(src, w, dst, n, H, W, Wh, scale,
                                                                             FastDivmod(), FastDivmod());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor band_filter_cuda(const at::Tensor& x, const at::Tensor& weights) {
  check_band_filter_args(x, weights);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = weights.size(0);
  if (K == 0 || B == 0 || C == 0 || H == 0 || W == 0) return at::zeros({K, B, C, H, W}, x.options().dtype(dtype));

  auto half = at::fft_rfft2(x.to(dtype)).contiguous();  // (B, C, H, Wh) complex
  auto w = weights.to(dtype).contiguous();
  const int64_t Wh = half.size(3);
  const int64_t per_mask = half.numel() * 2 * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t chunk = std::min<int64_t>({K, int64_t(65535), std::max<int64_t>(1, kChunkBytes / per_mask)});
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor out;
  if (chunk < K) out = at::empty({K, B, C, H, W}, x.options().dtype(dtype));
  at::Tensor buf = at::empty({chunk, B, C, H, Wh}, half.options());
  for (int64_t k0 = 0; k0 < K; k0 += chunk) {
    const int64_t kc = std::min(chunk, K - k0);
    at::Tensor part = buf.narrow(0, 0, kc);
    if (dtype == at::kDouble) {
      launch_mask_half_spectra<double>(half, w, k0, part, stream);
    } else {
      launch_mask_half_spectra<float>(half, w, k0, part, stream);
    }
    // norm "forward": the inverse is unscaled; 1/(H W) was applied with the weights.
    if (chunk == K) return at::fft_irfft2(part, at::IntArrayRef{H, W}, {-2, -1}, "forward");  // one chunk
    at::Tensor dst = out.narrow(0, k0, kc);
    at::fft_irfft2_out(dst, part, at::IntArrayRef{H, W}, {-2, -1}, "forward");
  }
  return out;
}

// ----------------------------------------------------------------------------- remove_frequencies

// Threads [0, K*BC): coef[k, bc] = c F_bc(u_k, v_k) / (H W).
// Threads [K*BC, K*BC + K*(H+W)): phase tables (cos, sin) of rows (length H) and columns (length W) per mask.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    remove_prep_kernel(const typename Vec2<scalar_t>::type* __restrict__ half, const int64_t* __restrict__ freqs,
                       typename Vec2<scalar_t>::type* __restrict__ coef,
                       typename Vec2<scalar_t>::type* __restrict__ row_tab,
                       typename Vec2<scalar_t>::type* __restrict__ col_tab, int64_t K, int64_t BC, int64_t H,
                       int64_t W, int64_t Wh) {
  using vec2_t = typename Vec2<scalar_t>::type;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_coef = K * BC;
  if (i < n_coef) {
    const int64_t k = i / BC, bc = i - k * BC;
    const int64_t u = wrap_index(freqs[2 * k], H), v = wrap_index(freqs[2 * k + 1], W);
    const int64_t u_mirror = (H - u) % H, v_mirror = (W - v) % W;
    vec2_t f;
    if (v < Wh) {
      f = half[(bc * H + u) * Wh + v];
    } else {  // F(u, v) = conj(F(-u, W - v)); W - v < Wh here
      f = half[(bc * H + u_mirror) * Wh + v_mirror];
      f.y = -f.y;
    }
    const double pixels = static_cast<double>(H) * static_cast<double>(W);
    const double scale = (u == u_mirror && v == v_mirror ? 1.0 : 2.0) / pixels;
    vec2_t c;
    c.x = static_cast<scalar_t>(f.x * scale);
    c.y = static_cast<scalar_t>(f.y * scale);
    coef[i] = c;
    return;
  }
  const int64_t j = i - n_coef;
  if (j >= K * (H + W)) return;
  const int64_t k = j / (H + W), r = j - k * (H + W);
  int64_t m, n;
  vec2_t* dst;
  if (r < H) {
    n = H;
    m = (wrap_index(freqs[2 * k], H) * r) % H;
    dst = row_tab + k * H + r;
  } else {
    n = W;
    m = (wrap_index(freqs[2 * k + 1], W) * (r - H)) % W;
    dst = col_tab + k * W + (r - H);
  }
  // angle / pi = 2 m / n, reduced to (-1, 1] from the exact integer m.
  double a = 2.0 * static_cast<double>(m) / static_cast<double>(n);
  if (a > 1.0) a -= 2.0;
  double s, c;
  sincospi(a, &s, &c);
  vec2_t t;
  t.x = static_cast<scalar_t>(c);
  t.y = static_cast<scalar_t>(s);
  *dst = t;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Pack<scalar_t, VEC> load_pack(const scalar_t* p) {
  Pack<scalar_t, VEC> r;
  if constexpr (VEC == 4 && sizeof(scalar_t) == 4) {
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    r.v[0] = t.x; r.v[1] = t.y; r.v[2] = t.z; r.v[3] = t.w;
  } else if constexpr (VEC == 2 && sizeof(scalar_t) == 8) {
    const double2 t = __ldg(reinterpret_cast<const double2*>(p));
    r.v[0] = t.x; r.v[1] = t.y;
  } else {
    static_assert(VEC == 1, "unsupported vector width");
    r.v[0] = __ldg(p);
  }
  return r;
}

template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* p, const Pack<scalar_t, VEC>& r) {
  // Streaming stores: the output is written once and not re-read here; keep x in L2.
  if constexpr (VEC == 4 && sizeof(scalar_t) == 4) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(r.v[0], r.v[1], r.v[2], r.v[3]));
  } else if constexpr (VEC == 2 && sizeof(scalar_t) == 8) {
    __stcs(reinterpret_cast<double2*>(p), make_double2(r.v[0], r.v[1]));
  } else {
    static_assert(VEC == 1, "unsupported vector width");
    __stcs(p, r.v[0]);
  }
}

// out[k, p] = x[p] - Re(coef[k, bc] * row[k, y] * col[k, x]) over p = (bc, y, x) in the slab of mask k.
// Block b covers elements [chunk * kElemsPerBlock, ...) of mask k's slab, k = b % K, chunk = b / K.
// VEC > 1 requires H*W % VEC == 0 and 16-byte aligned x and out, so a vector never leaves its plane.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    remove_pairs_kernel(const scalar_t* __restrict__ x, const typename Vec2<scalar_t>::type* __restrict__ coef,
                        const typename Vec2<scalar_t>::type* __restrict__ row_tab,
                        const typename Vec2<scalar_t>::type* __restrict__ col_tab, scalar_t* __restrict__ out,
                        int64_t K, int64_t BC, uint32_t H, uint32_t W, FastDivmod div_hw, FastDivmod div_w) {
  using vec2_t = typename Vec2<scalar_t>::type;
  const int64_t chunk = blockIdx.x / K;
  const int64_t k = blockIdx.x - chunk * K;
  const uint32_t HW = H * W;  // <= 2^30, checked on the host
  const int64_t slab = BC * static_cast<int64_t>(HW);
  const int64_t base = chunk * kElemsPerBlock;
  const int64_t plane0 = base / HW;
  const uint32_t e0 = static_cast<uint32_t>(base - plane0 * HW);
  const int32_t count = static_cast<int32_t>(min(static_cast<int64_t>(kElemsPerBlock), slab - base));
  const scalar_t* xs = x + base;
  scalar_t* os = out + k * slab + base;
  const vec2_t* ck = coef + k * BC + plane0;
  const vec2_t* rk = row_tab + k * H;
  const vec2_t* colk = col_tab + k * W;

  for (int32_t i = threadIdx.x * VEC; i < count; i += kThreads * VEC) {
    const uint32_t t = e0 + static_cast<uint32_t>(i);  // < 2^30 + kElemsPerBlock
    const uint32_t q = div_hw.div(t);                   // plane offset from plane0
    const uint32_t e = t - q * HW;
    uint32_t y = div_w.div(e);
    uint32_t xc = e - y * W;
    const vec2_t c = ck[q];
    vec2_t r = rk[y];
    scalar_t gr = c.x * r.x - c.y * r.y;  // g = coef * exp(i row phase)
    scalar_t gi = c.x * r.y + c.y * r.x;
    const Pack<scalar_t, VEC> in = load_pack<scalar_t, VEC>(xs + i);
    Pack<scalar_t, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (j > 0 && ++xc == W) {  // next row of the same plane (H*W % VEC == 0)
        xc = 0;
        ++y;
        r = rk[y];
        gr = c.x * r.x - c.y * r.y;
        gi = c.x * r.y + c.y * r.x;
      }
      const vec2_t cs = colk[xc];
      o.v[j] = in.v[j] - (gr * cs.x - gi * cs.y);
    }
    store_pack<scalar_t, VEC>(os + i, o);
  }
}

template <typename scalar_t>
void launch_remove_pairs(const at::Tensor& xc, const at::Tensor& half, const at::Tensor& freqs, at::Tensor& out,
                         cudaStream_t stream) {
  using vec2_t = typename Vec2<scalar_t>::type;
  const int64_t K = freqs.size(0), BC = xc.size(0) * xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t Wh = half.size(3);
  auto tables = at::empty({K * BC + K * (H + W), 2}, xc.options());
  auto* coef = reinterpret_cast<vec2_t*>(tables.data_ptr());
  vec2_t* row_tab = coef + K * BC;
  vec2_t* col_tab = row_tab + K * H;

  const int64_t n_prep = K * BC + K * (H + W);
  const int64_t prep_blocks = (n_prep + kThreads - 1) / kThreads;
  TORCH_CHECK(prep_blocks <= std::numeric_limits<int32_t>::max(), "remove_frequencies: input too large");
  remove_prep_kernel<scalar_t><<<static_cast<unsigned>(prep_blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const vec2_t*>(half.data_ptr()), freqs.data_ptr<int64_t>(), coef, row_tab, col_tab, K, BC, H,
      W, Wh);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t HW = H * W;
  const int64_t chunks = (BC * HW + kElemsPerBlock - 1) / kElemsPerBlock;
  TORCH_CHECK(chunks * K <= std::numeric_limits<int32_t>::max(),
              "remove_frequencies: output too large for one launch (", K, " masks x ", BC * HW,
              " elements); pass fewer masks at a time");
  const dim3 grid(static_cast<unsigned>(chunks * K));
  const FastDivmod div_hw(static_cast<uint32_t>(HW)), div_w(static_cast<uint32_t>(W));
  const scalar_t* xp = xc.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(xp) % 16 == 0 && reinterpret_cast<uintptr_t>(op) % 16 == 0;
  if (aligned && HW % kVec == 0) {
    remove_pairs_kernel<scalar_t, kVec><<<grid, kThreads, 0, stream>>>(
        xp, coef, row_tab, col_tab, op, K, BC, static_cast<uint32_t>(H), static_cast<uint32_t>(W), div_hw, div_w);
  } else {
    remove_pairs_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
        xp, coef, row_tab, col_tab, op, K, BC, static_cast<uint32_t>(H), static_cast<uint32_t>(W), div_hw, div_w);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor remove_frequencies_cuda(const at::Tensor& x, const at::Tensor& freqs) {
  check_remove_frequencies_args(x, freqs);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = freqs.size(0);
  if (K == 0 || B == 0 || C == 0 || H == 0 || W == 0) return at::zeros({K, B, C, H, W}, x.options().dtype(dtype));
  TORCH_CHECK(H * W <= (int64_t(1) << 30),
              "remove_frequencies: images of more than 2^30 pixels are not supported, got ", H, " x ", W);

  auto xc = x.to(dtype).contiguous();
  auto half = at::fft_rfft2(xc).contiguous();  // (B, C, H, W/2+1) complex
  auto fr = freqs.contiguous();
  auto out = at::empty({K, B, C, H, W}, x.options().dtype(dtype));
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kDouble) {
    launch_remove_pairs<double>(xc, half, fr, out, stream);
  } else {
    launch_remove_pairs<float>(xc, half, fr, out, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CUDA, m) {
  m.impl("band_filter", &band_filter_cuda);
  m.impl("remove_frequencies", &remove_frequencies_cuda);
}

}  // namespace shortcut_fast
