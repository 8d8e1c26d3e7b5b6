// CUDA kernel of probe_stats: sufficient statistics of linear probes for one chunk.
//
//   x (N, D), z (N, K) -> (x^T x (D, D), x^T z (D, K), sum_n x (D), sum_n z (K), sum_n z^2 (K))
//
// The two products go to cuBLAS through at::mm (tensor-core GEMMs; float32 follows
// torch.backends.cuda.matmul.allow_tf32 like any torch matmul). The column reductions are
// one fused kernel over [x | z]: thread c of a block owns column c, so every warp reads
// consecutive addresses of a row (coalesced), and blockIdx.y splits the rows so that
// short-and-wide and tall-and-narrow chunks both fill the GPU. Each (row split, column)
// writes a double partial (sum, and sum of squares for z columns); a final ATen sum over
// the splits makes the result deterministic (no atomics).
#include <ATen/ATen.h>
#include <torch/library.h>
#include "../checks.h"
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <algorithm>
#include <cstdint>
#include <limits>

namespace shortcut_fast {
namespace {

constexpr int kThreads = 256;

// partial (S, D + 2K) double: [sum x | sum z | sum z^2] over the rows of split blockIdx.y.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    fused_sums_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z, double* __restrict__ partial,
                      int64_t N, int64_t D, int64_t K, int64_t rows_per_split) {
  const int64_t C = D + K;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= C) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = min(N, r0 + rows_per_split);
  double* p = partial + static_cast<int64_t>(blockIdx.y) * (C + K);
  if (c < D) {
    double s = 0.0;
    for (int64_t n = r0; n < r1; ++n) s += static_cast<double>(__ldg(x + n * D + c));
    p[c] = s;
  } else {
    const int64_t k = c - D;
    double s = 0.0, q = 0.0;
    for (int64_t n = r0; n < r1; ++n) {
      const double v = static_cast<double>(__ldg(z + n * K + k));
      s += v;
      q += v * v;
    }
    p[c] = s;
    p[C + k] = q;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> probe_stats_cuda(const at::Tensor& x_in,
                                                                                         const at::Tensor& z_in) {
  check_probe_stats_args(x_in, z_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto z = z_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = z.size(1), C = D + K;
  auto xt = x.t();
  at::Tensor xx = at::mm(xt, x);
  at::Tensor xz = at::mm(xt, z);
  if (N == 0 || C == 0) {
    return {xx, xz, at::zeros({D}, x.options()), at::zeros({K}, x.options()), at::zeros({K}, x.options())};
  }
  const int64_t col_blocks = (C + kThreads - 1) / kThreads;
  TORCH_CHECK(col_blocks <= std::numeric_limits<int32_t>::max(), "probe_stats: too many columns (", C, ")");
  // About 4 blocks per SM in total, at least 64 rows per split, at most 65535 splits (grid y).
  int sm_count = 0;  // ATen/cuda/CUDAContext.h would pull in cuSPARSE headers: ask the runtime
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, x.device().index()));
  const int64_t sms = std::max(sm_count, 1);
  const int64_t want = std::max<int64_t>(1, (4 * sms + col_blocks - 1) / col_blocks);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, (N + 63) / 64, int64_t(65535)}));
  const int64_t rows_per_split = (N + splits - 1) / splits;
  const int64_t used_splits = (N + rows_per_split - 1) / rows_per_split;
  at::Tensor partial = at::empty({used_splits, C + K}, x.options().dtype(at::kDouble));
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(used_splits));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "probe_stats_cuda", [&] {
    fused_sums_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                                                                partial.data_ptr<double>(), N, D, K,
                                                                rows_per_split);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor sums = partial.sum(0).to(x.scalar_type());  // (D + 2K)
  return {xx, xz, sums.narrow(0, 0, D), sums.narrow(0, D, K), sums.narrow(0, C, K)};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CUDA, m) { m.impl("probe_stats", &probe_stats_cuda); }

}  // namespace shortcut_fast
