// CUDA kernel of class_spectrum_sum: one batched real FFT (cuFFT through ATen), then a
// fused |.| + per-class reduction over the half spectrum, mirrored to the full grid by
// Hermitian symmetry. Each thread owns one (channel, u, v) position for a chunk of
// images and keeps a running sum while consecutive images share a label, so class-sorted
// streams (the common case) cost one atomic per chunk and position.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include "../checks.h"

namespace shortcut_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kImagesPerChunk = 16;

template <typename scalar_t, typename complex_t>
__global__ void class_spectrum_reduce_kernel(const complex_t* __restrict__ half, const int64_t* __restrict__ labels,
                                             scalar_t* __restrict__ out, int64_t B, int64_t C, int64_t H, int64_t W,
                                             int64_t Wh, int64_t K) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;  // over C*H*W
  if (pos >= C * H * W) return;
  const int64_t v = pos % W;
  const int64_t u = (pos / W) % H;
  const int64_t c = pos / (W * H);
  // Column and row to read in the half spectrum; the mirrored value has the same modulus.
  const bool direct = v < Wh;
  const int64_t src_u = direct ? u : (H - u) % H;
  const int64_t src_v = direct ? v : W - v;

  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * kImagesPerChunk;
  const int64_t b1 = min(b0 + kImagesPerChunk, B);
  int64_t current = -1;
  scalar_t acc = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k = labels[b];
    if (k < 0 || k >= K) continue;  // validated in Python; never write out of bounds
    if (k != current) {
      if (current >= 0) atomicAdd(out + ((current * C + c) * H + u) * W + v, acc);
      current = k;
      acc = 0;
    }
    const complex_t z = half[((b * C + c) * H + src_u) * Wh + src_v];
    acc += sqrt(z.x * z.x + z.y * z.y);
  }
  if (current >= 0) atomicAdd(out + ((current * C + c) * H + u) * W + v, acc);
}

at::Tensor class_spectrum_sum_cuda(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  check_class_spectrum_args(x, labels, num_classes);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = spectrum_compute_dtype(x);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto out = at::zeros({num_classes, C, H, W}, x.options().dtype(dtype));
  if (B == 0 || C == 0 || H == 0 || W == 0) return out;
  auto half = at::fft_rfft2(x.to(dtype)).contiguous();
  auto lab = labels.contiguous();
  const int64_t Wh = half.size(3);
  const int64_t positions = C * H * W;
  const dim3 grid(static_cast<unsigned>((positions + kThreads - 1) / kThreads),
                  static_cast<unsigned>((B + kImagesPerChunk - 1) / kImagesPerChunk));
  TORCH_CHECK(grid.y <= 65535, "class_spectrum_sum: batch too large for one launch; pass at most ",
              65535 * kImagesPerChunk, " images at a time");
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kDouble) {
    class_spectrum_reduce_kernel<double, double2><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const double2*>(half.data_ptr()), lab.data_ptr<int64_t>(), out.data_ptr<double>(), B, C, H,
        W, Wh, num_classes);
  } else {
    class_spectrum_reduce_kernel<float, float2><<<grid, kThreads, 0, stream>>>(
        reinterpret_cast<const float2*>(half.data_ptr()), lab.data_ptr<int64_t>(), out.data_ptr<float>(), B, C, H, W,
        Wh, num_classes);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CUDA, m) { m.impl("class_spectrum_sum", &class_spectrum_sum_cuda); }

}  // namespace shortcut_fast
