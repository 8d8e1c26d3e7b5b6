// CPU kernel of probe_stats: sufficient statistics of linear probes for one chunk.
//
//   x (N, D), z (N, K) -> (x^T x (D, D), x^T z (D, K), sum_n x (D), sum_n z (K), sum_n z^2 (K))
//
// The two products are ATen GEMMs (MKL / OpenBLAS, already multithreaded and blocked far
// better than anything hand-written here). The three column reductions are one fused
// OpenMP pass over x and z: the work is split into a fixed grid of (row block, column
// block) tiles that depends on the shape only, each tile accumulates in double into its
// own partial row, and the partials are summed in block order. The result is therefore
// bit-identical whatever the thread count, and z is read once for both sum and sum of
// squares (the reference reads it twice and allocates z^2).
#include <torch/extension.h>
#include "../checks.h"
#include <algorithm>
#include <vector>

namespace shortcut_fast {
namespace {

// Columns per tile: a few KB of each row, so a tile streams through L1/L2.
constexpr int64_t kColBlock = 512;
// Rows per row block at least this many; at most kMaxRowBlocks row blocks (partials memory).
constexpr int64_t kMinRows = 256;
constexpr int64_t kMaxRowBlocks = 16;

// partial[r, c] for c < D: sum of x[:, c] over row block r; D + k: sum of z[:, k]; D + K + k: sum of z^2.
template <typename scalar_t>
void fused_sums(const scalar_t* x, const scalar_t* z, int64_t N, int64_t D, int64_t K, scalar_t* sum_x,
                scalar_t* sum_z, scalar_t* sumsq_z) {
  const int64_t C = D + K;  // columns of [x | z]
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>(kMaxRowBlocks, N / kMinRows));
  const int64_t rows_per = (N + row_blocks - 1) / row_blocks;
  const int64_t col_blocks = (C + kColBlock - 1) / kColBlock;
  std::vector<double> partial(static_cast<size_t>(row_blocks * (C + K)), 0.0);
  double* part = partial.data();
  at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t / col_blocks, cb = t % col_blocks;
      const int64_t r0 = rb * rows_per, r1 = std::min(N, r0 + rows_per);
      const int64_t c0 = cb * kColBlock, c1 = std::min(C, c0 + kColBlock);
      double* p = part + rb * (C + K);
      // Column ranges of this tile inside x and inside z.
      const int64_t x0 = std::min(c0, D), x1 = std::min(c1, D);
      const int64_t z0 = std::max(c0, D) - D, z1 = std::max(c1, D) - D;
      for (int64_t n = r0; n < r1; ++n) {
        const scalar_t* xr = x + n * D;
        for (int64_t j = x0; j < x1; ++j) p[j] += static_cast<double>(xr[j]);
        const scalar_t* zr = z + n * K;
        double* ps = p + D;
        double* pq = p + D + K;
        for (int64_t k = z0; k < z1; ++k) {
          const double v = static_cast<double>(zr[k]);
          ps[k] += v;
          pq[k] += v * v;
        }
      }
    }
  });
  at::parallel_for(0, C + K, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double s = 0.0;
      for (int64_t rb = 0; rb < row_blocks; ++rb) s += part[rb * (C + K) + c];
      const scalar_t v = static_cast<scalar_t>(s);
      if (c < D) {
        sum_x[c] = v;
      } else if (c < C) {
        sum_z[c - D] = v;
      } else {
        sumsq_z[c - C] = v;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> probe_stats_cpu(const at::Tensor& x_in,
                                                                                        const at::Tensor& z_in) {
  check_probe_stats_args(x_in, z_in);
  const auto x = x_in.contiguous();
  const auto z = z_in.contiguous();
  const int64_t N = x.size(0), D = x.size(1), K = z.size(1);
  auto xt = x.t();
  at::Tensor xx = at::mm(xt, x);  // (D, D); zeros when N == 0
  at::Tensor xz = at::mm(xt, z);  // (D, K)
  at::Tensor sum_x = at::empty({D}, x.options());
  at::Tensor sum_z = at::empty({K}, x.options());
  at::Tensor sumsq_z = at::empty({K}, x.options());
  if (N == 0) {
    sum_x.zero_();
    sum_z.zero_();
    sumsq_z.zero_();
  } else if (D + K > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "probe_stats_cpu", [&] {
      fused_sums<scalar_t>(x.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), N, D, K, sum_x.data_ptr<scalar_t>(),
                           sum_z.data_ptr<scalar_t>(), sumsq_z.data_ptr<scalar_t>());
    });
  }
  return {xx, xz, sum_x, sum_z, sumsq_z};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CPU, m) { m.impl("probe_stats", &probe_stats_cpu); }

}  // namespace shortcut_fast
