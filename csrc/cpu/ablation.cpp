// CPU kernels of channel_ablate and group_outcomes (shortcut_fast.ops.ablation).
//
// channel_ablate copies values, so it works on the raw bits: the element type is chosen
// by size only (uint16/32/64), which makes every float dtype bit-exact (NaN payloads and
// -0.0 included). Parallel over (v, p) rows of C*S elements; per channel either a
// memcpy-like copy of S values or a fill. For S == 1 (channels last, (B, C) features) the
// inner loop is a branch-free select over C that the compiler vectorizes.
//
// group_outcomes: one pass over each (v, b) logit row computes the first argmax and the
// log-sum-exp (max-shifted, in float32, or float64 for float64 logits). Samples are split
// into fixed chunks; each chunk accumulates its own (G,) partials and the partials are
// summed in chunk order afterwards, so the result does not depend on the thread count.
#include <torch/extension.h>
#include "../checks.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace shortcut_fast {
namespace {

template <typename bits_t>
void ablate_rows(const bits_t* act, const bool* mask, const bits_t* rep, bool full_rep, bits_t* out, int64_t V,
                 int64_t P, int64_t C, int64_t S) {
  const int64_t row = C * S;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row, 1));
  at::parallel_for(0, V * P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t vp = begin; vp < end; ++vp) {
      const int64_t v = vp / P, p = vp % P;
      const bool* m = mask + v * C;
      const bits_t* a = act + p * row;
      const bits_t* r = full_rep ? rep + p * row : rep;
      bits_t* o = out + vp * row;
      if (S == 1) {
        for (int64_t c = 0; c < C; ++c) o[c] = m[c] ? r[c] : a[c];
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        bits_t* oc = o + c * S;
        if (!m[c]) {
          std::memcpy(oc, a + c * S, S * sizeof(bits_t));
        } else if (full_rep) {
          std::memcpy(oc, r + c * S, S * sizeof(bits_t));
        } else {
          std::fill(oc, oc + S, r[c]);
        }
      }
    }
  });
}

at::Tensor channel_ablate_cpu(const at::Tensor& act, const at::Tensor& mask, const at::Tensor& replacement) {
  check_channel_ablate_args(act, mask, replacement);
  const int64_t P = act.size(0), C = act.size(1), S = act.size(2), V = mask.size(0);
  auto out = at::empty({V, P, C, S}, act.options());
  if (out.numel() == 0) return out;
  auto a = act.contiguous();
  auto m = mask.contiguous();
  auto r = replacement.to(act.scalar_type()).contiguous();
  const bool full = r.dim() == 3;
  switch (act.element_size()) {
    case 2:
      ablate_rows<uint16_t>(reinterpret_cast<const uint16_t*>(a.data_ptr()), m.data_ptr<bool>(),
                            reinterpret_cast<const uint16_t*>(r.data_ptr()), full,
                            reinterpret_cast<uint16_t*>(out.data_ptr()), V, P, C, S);
      break;
    case 4:
      ablate_rows<uint32_t>(reinterpret_cast<const uint32_t*>(a.data_ptr()), m.data_ptr<bool>(),
                            reinterpret_cast<const uint32_t*>(r.data_ptr()), full,
                            reinterpret_cast<uint32_t*>(out.data_ptr()), V, P, C, S);
      break;
    case 8:
      ablate_rows<uint64_t>(reinterpret_cast<const uint64_t*>(a.data_ptr()), m.data_ptr<bool>(),
                            reinterpret_cast<const uint64_t*>(r.data_ptr()), full,
                            reinterpret_cast<uint64_t*>(out.data_ptr()), V, P, C, S);
      break;
    default:
      TORCH_CHECK(false, "channel_ablate: unsupported element size ", act.element_size());
  }
  return out;
}

// Samples per chunk of group_outcomes: the unit of parallel work and of partial sums.
constexpr int64_t kSamplesPerChunk = 256;

template <typename in_t, typename acc_t>
void group_outcomes_impl(const in_t* logits, const int64_t* labels, const int64_t* groups, int64_t V, int64_t B,
                         int64_t L, int64_t G, int64_t* correct, acc_t* loss) {
  const int64_t n_chunks = (B + kSamplesPerChunk - 1) / kSamplesPerChunk;
  std::vector<int64_t> part_correct(V * n_chunks * G, 0);
  std::vector<acc_t> part_loss(V * n_chunks * G, acc_t(0));
  at::parallel_for(0, V * n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t vc = begin; vc < end; ++vc) {
      const int64_t v = vc / n_chunks, chunk = vc % n_chunks;
      int64_t* pc = part_correct.data() + vc * G;
      acc_t* pl = part_loss.data() + vc * G;
      const int64_t b1 = std::min(B, (chunk + 1) * kSamplesPerChunk);
      for (int64_t b = chunk * kSamplesPerChunk; b < b1; ++b) {
        const in_t* row = logits + (v * B + b) * L;
        acc_t best = static_cast<acc_t>(row[0]);
        int64_t arg = 0;
        for (int64_t l = 1; l < L; ++l) {  // strict > keeps the first maximum
          const acc_t x = static_cast<acc_t>(row[l]);
          if (x > best) {
            best = x;
            arg = l;
          }
        }
        acc_t sum = 0;
        for (int64_t l = 0; l < L; ++l) sum += std::exp(static_cast<acc_t>(row[l]) - best);
        const int64_t y = labels[b], g = groups[b];
        if (g < 0 || g >= G || y < 0 || y >= L) continue;  // validated in Python; never write out of bounds
        pc[g] += arg == y;
        pl[g] += std::log(sum) + best - static_cast<acc_t>(row[y]);
      }
    }
  });
  for (int64_t v = 0; v < V; ++v) {
    for (int64_t chunk = 0; chunk < n_chunks; ++chunk) {
      const int64_t off = (v * n_chunks + chunk) * G;
      for (int64_t g = 0; g < G; ++g) {
        correct[v * G + g] += part_correct[off + g];
        loss[v * G + g] += part_loss[off + g];
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> group_outcomes_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                      const at::Tensor& groups, int64_t num_groups) {
  check_group_outcomes_args(logits, labels, groups, num_groups);
  const int64_t V = logits.size(0), B = logits.size(1), L = logits.size(2);
  const auto loss_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto correct = at::zeros({V, num_groups}, logits.options().dtype(at::kLong));
  auto loss = at::zeros({V, num_groups}, logits.options().dtype(loss_dtype));
  if (V == 0 || B == 0) return {correct, loss};
  auto lg = logits.contiguous();
  auto lab = labels.contiguous();
  auto grp = groups.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(), "group_outcomes_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    group_outcomes_impl<scalar_t, acc_t>(lg.data_ptr<scalar_t>(), lab.data_ptr<int64_t>(), grp.data_ptr<int64_t>(),
                                         V, B, L, num_groups, correct.data_ptr<int64_t>(),
                                         loss.data_ptr<acc_t>());
  });
  return {correct, loss};
}

}  // namespace

TORCH_LIBRARY_IMPL(shortcut_fast, CPU, m) {
  m.impl("channel_ablate", &channel_ablate_cpu);
  m.impl("group_outcomes", &group_outcomes_cpu);
}

}  // namespace shortcut_fast
