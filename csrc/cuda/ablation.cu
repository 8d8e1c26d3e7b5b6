// CUDA kernels of channel_ablate and group_outcomes (shortcut_fast.ops.ablation).
//
// channel_ablate copies raw bits (the element type is chosen by size: 2/4/8 bytes), so every
// float dtype passes through bit-exact. Each thread owns one 16-byte pack of act (a pack
// never straddles a channel: used when S is a multiple of the pack length and all pointers
// are 16-byte aligned; otherwise one element per thread), loads it and its replacement
// once and writes them to a run of variants (grid.y splits the variants when act alone
// has too few packs to fill the device). act is read once, every output element written
// once: the op is bound by the output write.
//
// group_outcomes: one block of 8 warps per (variant, chunk of samples); each warp takes one
// sample at a time, lanes stride over the L logits with an online (max, sum exp) and a
// running first argmax, combined across lanes with shuffles (ties go to the smaller index,
// as torch.argmax). Lane 0 adds the sample's loss and hit to per-group partials in shared
// memory; the block then adds its nonzero partials to the (V, G) outputs with atomics
// (for G above kSharedGroups, samples go straight to global atomics). The counts are exact;
// the float loss sum order depends on scheduling.
#include <ATen/ATen.h>
#include <torch/library.h>
#include "../checks.h"
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <limits>

namespace shortcut_fast {
namespace {

constexpr int kThreads = 256;

// ----------------------------------------------------------------------------- channel_ablate

template <typename bits_t, int VEC>
struct alignas(sizeof(bits_t) * VEC) Pack {
  bits_t x[VEC];
};

template <typename bits_t, int VEC, bool FULL>
__global__ void channel_ablate_kernel(const Pack<bits_t, VEC>* __restrict__ act, const bool* __restrict__ mask,
                                      const Pack<bits_t, VEC>* __restrict__ rep_full,
                                      const bits_t* __restrict__ rep_channel, Pack<bits_t, VEC>* __restrict__ out,
                                      int64_t n_packs, int64_t C, int64_t s_packs, int64_t V, int64_t v_per_block) {
  const int64_t v0 = static_cast<int64_t>(blockIdx.y) * v_per_block;
  const int64_t v1 = min(V, v0 + v_per_block);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_packs; i += stride) {
    const int64_t c = (i / s_packs) % C;
    const Pack<bits_t, VEC> a = act[i];
    Pack<bits_t, VEC> r;
    if (FULL) {
      r = rep_full[i];
    } else {
      const bits_t value = rep_channel[c];
#pragma unroll
      for (int k = 0; k < VEC; ++k) r.x[k] = value;
    }
    for (int64_t v = v0; v < v1; ++v) out[v * n_packs + i] = mask[v * C + c] ? r : a;
  }
}

template <typename bits_t, int VEC>
void launch_ablate(const at::Tensor& act, const at::Tensor& mask, const at::Tensor& rep, at::Tensor& out) {
  using pack_t = Pack<bits_t, VEC>;
  const int64_t V = mask.size(0), C = act.size(1), S = act.size(2);
  const int64_t n_packs = act.numel() / VEC;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, act.get_device()));
  const int64_t target_blocks = static_cast<int64_t>(sms) * 16;
  const int64_t blocks_x = std::min<int64_t>((n_packs + kThreads - 1) / kThreads, target_blocks);
  // Split the variants over grid.y only as far as needed to fill the device.
  const int64_t v_groups =
      std::min<int64_t>({V, std::max<int64_t>(1, (target_blocks + blocks_x - 1) / blocks_x), int64_t(65535)});
  const int64_t v_per_block = (V + v_groups - 1) / v_groups;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>((V + v_per_block - 1) / v_per_block));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* a = reinterpret_cast<const pack_t*>(act.data_ptr());
  auto* o = reinterpret_cast<pack_t*>(out.data_ptr());
  const bool* m = mask.data_ptr<bool>();
  if (rep.dim() == 3) {
    channel_ablate_kernel<bits_t, VEC, true><<<grid, kThreads, 0, stream>>>(
        a, m, reinterpret_cast<const pack_t*>(rep.data_ptr()), nullptr, o, n_packs, C, S / VEC, V, v_per_block);
  } else {
    channel_ablate_kernel<bits_t, VEC, false><<<grid, kThreads, 0, stream>>>(
        a, m, nullptr, reinterpret_cast<const bits_t*>(rep.data_ptr()), o, n_packs, C, S / VEC, V, v_per_block);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename bits_t>
void ablate_dispatch_vec(const at::Tensor& act, const at::Tensor& mask, const at::Tensor& rep, at::Tensor& out) {
  constexpr int VEC = 16 / sizeof(bits_t);
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  if (act.size(2) % VEC == 0 && aligned(act) && aligned(out) && (rep.dim() == 1 || aligned(rep))) {
    launch_ablate<bits_t, VEC>(act, mask, rep, out);
  } else {
    launch_ablate<bits_t, 1>(act, mask, rep, out);
  }
}

at::Tensor channel_ablate_cuda(const at::Tensor& act, const at::Tensor& mask, const at::Tensor& replacement) {
  check_channel_ablate_args(act, mask, replacement);
  const c10::cuda::CUDAGuard guard(act.device());
  const int64_t P = act.size(0), C = act.size(1), S = act.size(2), V = mask.size(0);
  auto out = at::empty({V, P, C, S}, act.options());
  if (out.numel() == 0) return out;
  auto a = act.contiguous();
  auto m = mask.contiguous();
  auto r = replacement.to(act.scalar_type()).contiguous();
  switch (act.element_size()) {
    case 2: ablate_dispatch_vec<uint16_t>(a, m, r, out); break;
    case 4: ablate_dispatch_vec<uint32_t>(a, m, r, out); break;
    case 8: ablate_dispatch_vec<uint64_t>(a, m, r, out); break;
    default: TORCH_CHECK(false, "channel_ablate: unsupported element size ", act.element_size());
  }
  return out;
}

// ----------------------------------------------------------------------------- group_outcomes

constexpr int kWarps = kThreads / 32;
constexpr int64_t kSamplesPerBlock = 256;
constexpr int64_t kSharedGroups = 2048;  // per-group partials in shared memory up to this G

template <typename acc_t>
__device__ __forceinline__ void combine(acc_t& m, acc_t& s, int64_t& arg, acc_t m2, acc_t s2, int64_t arg2) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (m2 == ninf) return;  // the other lane saw no logits
  if (m == ninf) {
    m = m2; s = s2; arg = arg2;
    return;
  }
  const acc_t mx = m > m2 ? m : m2;
  s = s * exp(m - mx) + s2 * exp(m2 - mx);
  if (m2 > m || (m2 == m && arg2 < arg)) arg = arg2;
  m = mx;
}

template <typename in_t, typename acc_t, bool SHARED>
__global__ void group_outcomes_kernel(const in_t* __restrict__ logits, const int64_t* __restrict__ labels,
                                      const int64_t* __restrict__ groups, unsigned long long* __restrict__ correct,
                                      acc_t* __restrict__ loss, int64_t B, int64_t L, int64_t G, int64_t n_chunks) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* s_loss = reinterpret_cast<acc_t*>(smem_raw);
  unsigned int* s_hits = reinterpret_cast<unsigned int*>(s_loss + (SHARED ? G : 0));
  const int64_t v = blockIdx.x / n_chunks;
  const int64_t chunk = blockIdx.x % n_chunks;
  if (SHARED) {
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
      s_loss[g] = 0;
      s_hits[g] = 0;
    }
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const int64_t b_end = min(B, (chunk + 1) * kSamplesPerBlock);
  for (int64_t b = chunk * kSamplesPerBlock + warp; b < b_end; b += kWarps) {
    const in_t* row = logits + (v * B + b) * L;
    acc_t m = ninf, s = 0;
    int64_t arg = 0;
    for (int64_t l = lane; l < L; l += 32) {
      const acc_t x = static_cast<acc_t>(row[l]);
      if (x > m) {  // strict: within a lane the earlier index wins ties
        s = (m == ninf ? acc_t(0) : s * exp(m - x)) + 1;
        m = x;
        arg = l;
      } else {
        s += exp(x - m);
      }
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const acc_t m2 = __shfl_down_sync(0xffffffffu, m, offset);
      const acc_t s2 = __shfl_down_sync(0xffffffffu, s, offset);
      const int64_t arg2 = __shfl_down_sync(0xffffffffu, arg, offset);
      combine(m, s, arg, m2, s2, arg2);
    }
    if (lane == 0) {
      const int64_t y = labels[b], g = groups[b];
      if (g < 0 || g >= G || y < 0 || y >= L) continue;  // validated in Python; never write out of bounds
      const acc_t sample_loss = log(s) + m - static_cast<acc_t>(row[y]);
      const unsigned int hit = arg == y ? 1u : 0u;
      if (SHARED) {
        atomicAdd(s_loss + g, sample_loss);
        atomicAdd(s_hits + g, hit);
      } else {
        atomicAdd(loss + v * G + g, sample_loss);
        if (hit) atomicAdd(correct + v * G + g, 1ull);
      }
    }
  }
  if (SHARED) {
    __syncthreads();
    for (int64_t g = threadIdx.x; g < G; g += blockDim.x) {
      if (s_hits[g]) atomicAdd(correct + v * G + g, static_cast<unsigned long long>(s_hits[g]));
      if (s_loss[g] != 0) atomicAdd(loss + v * G + g, s_loss[g]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> group_outcomes_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                       const at::Tensor& groups, int64_t num_groups) {
  check_group_outcomes_args(logits, labels, groups, num_groups);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t V = logits.size(0), B = logits.size(1), L = logits.size(2), G = num_groups;
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto correct = at::zeros({V, G}, logits.options().dtype(at::kLong));
  auto loss = at::zeros({V, G}, logits.options().dtype(loss_dtype));
  if (V == 0 || B == 0) return {correct, loss};
  auto lg = logits.contiguous();
  auto lab = labels.contiguous();
  auto grp = groups.contiguous();
  const int64_t n_chunks = (B + kSamplesPerBlock - 1) / kSamplesPerBlock;
  TORCH_CHECK(V * n_chunks <= std::numeric_limits<int32_t>::max(), "group_outcomes: too many variants x samples");
  const bool shared = G <= kSharedGroups;
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto* hits = reinterpret_cast<unsigned long long*>(correct.data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "group_outcomes_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = shared ? G * (sizeof(acc_t) + sizeof(unsigned int)) : 0;
    const auto blocks = static_cast<unsigned>(V * n_chunks);
    if (shared) {
      group_outcomes_kernel<scalar_t, acc_t, true><<<blocks, kThreads, smem, stream>>>(
          lg.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), grp.data_ptr<int64_t>(), hits, loss.data_ptr<acc_t>(), B,
          L, G, n_chunks);
    } else {
      group_outcomes_kernel<scalar_t, acc_t, false><<<blocks, kThreads, 0, stream>>>(
          lg.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), grp.data_ptr<int64_t>(), hits, loss.data_ptr<acc_t>(), B,
          L, G, n_chunks);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {correct, loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CUDA, m) {
  m.impl("channel_ablate", &channel_ablate_cuda);
  m.impl("group_outcomes", &group_outcomes_cuda);
}

}  // namespace shortcut_fast
