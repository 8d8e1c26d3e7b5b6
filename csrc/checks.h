// Argument checks shared by the CPU and CUDA implementations. The Python API checks
// first with friendlier messages; these guard direct torch.ops calls.
#pragma once
// ATen and the op registry, not torch/extension.h (the whole C++ API and pybind11): the CUDA
// files include only these, which halves their compile time.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace shortcut_fast {

inline void check_class_spectrum_args(const at::Tensor& x, const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK(x.dim() == 4, "class_spectrum_sum: x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "class_spectrum_sum: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0),
              "class_spectrum_sum: labels must have shape (", x.size(0), ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "class_spectrum_sum: labels must be int64, got ",
              labels.scalar_type());
  TORCH_CHECK(labels.device() == x.device(), "class_spectrum_sum: labels must be on ", x.device());
  TORCH_CHECK(num_classes >= 1, "class_spectrum_sum: num_classes must be >= 1, got ", num_classes);
}

inline void check_band_filter_args(const at::Tensor& x, const at::Tensor& weights) {
  TORCH_CHECK(x.dim() == 4, "band_filter: x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "band_filter: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(weights.dim() == 3 && weights.size(1) == x.size(2) && weights.size(2) == x.size(3),
              "band_filter: weights must have shape (K, ", x.size(2), ", ", x.size(3), ") to match x, got ",
              weights.sizes());
  TORCH_CHECK(at::isFloatingType(weights.scalar_type()), "band_filter: weights must be real floating point, got ",
              weights.scalar_type());
  TORCH_CHECK(weights.device() == x.device(), "band_filter: weights must be on ", x.device(), ", got ",
              weights.device());
}

// freqs (K, 2) int64 (u, v); values are taken modulo (H, W) like the periodic fft2 grid
// (the Python API rejects values outside [0, H) x [0, W) before calling).
inline void check_remove_frequencies_args(const at::Tensor& x, const at::Tensor& freqs) {
  TORCH_CHECK(x.dim() == 4, "remove_frequencies: x must have shape (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "remove_frequencies: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(freqs.dim() == 2 && freqs.size(1) == 2, "remove_frequencies: freqs must have shape (K, 2), got ",
              freqs.sizes());
  TORCH_CHECK(freqs.scalar_type() == at::kLong, "remove_frequencies: freqs must be int64, got ",
              freqs.scalar_type());
  TORCH_CHECK(freqs.device() == x.device(), "remove_frequencies: freqs must be on ", x.device(), ", got ",
              freqs.device());
}

inline void check_probe_stats_args(const at::Tensor& x, const at::Tensor& z) {
  TORCH_CHECK(x.dim() == 2, "probe_stats: x must have shape (N, D), got ", x.sizes());
  TORCH_CHECK(z.dim() == 2, "probe_stats: z must have shape (N, K), got ", z.sizes());
  TORCH_CHECK(z.size(0) == x.size(0), "probe_stats: z must have as many rows as x (", x.size(0), "), got ",
              z.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "probe_stats: x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(z.scalar_type() == x.scalar_type(), "probe_stats: z must have x's dtype (", x.scalar_type(), "), got ",
              z.scalar_type());
  TORCH_CHECK(z.device() == x.device(), "probe_stats: z must be on ", x.device(), ", got ", z.device());
}

inline void check_channel_ablate_args(const at::Tensor& act, const at::Tensor& mask, const at::Tensor& rep) {
  TORCH_CHECK(act.dim() == 3, "channel_ablate: act must have shape (P, C, S), got ", act.sizes());
  TORCH_CHECK(at::isFloatingType(act.scalar_type()), "channel_ablate: act must be floating point, got ",
              act.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(1) == act.size(1), "channel_ablate: mask must have shape (V, ",
              act.size(1), "), got ", mask.sizes());
  TORCH_CHECK(mask.scalar_type() == at::kBool, "channel_ablate: mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK((rep.dim() == 1 && rep.size(0) == act.size(1)) || rep.sizes() == act.sizes(),
              "channel_ablate: replacement must have shape (", act.size(1), ",) or ", act.sizes(), ", got ",
              rep.sizes());
  TORCH_CHECK(mask.device() == act.device() && rep.device() == act.device(),
              "channel_ablate: mask and replacement must be on ", act.device());
}

inline void check_group_outcomes_args(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& groups,
                               int64_t num_groups) {
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) >= 1, "group_outcomes: logits must have shape (V, B, L), got ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), "group_outcomes: logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(1), "group_outcomes: labels must have shape (",
              logits.size(1), ",), got ", labels.sizes());
  TORCH_CHECK(groups.dim() == 1 && groups.size(0) == logits.size(1), "group_outcomes: groups must have shape (",
              logits.size(1), ",), got ", groups.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong && groups.scalar_type() == at::kLong,
              "group_outcomes: labels and groups must be int64");
  TORCH_CHECK(labels.device() == logits.device() && groups.device() == logits.device(),
              "group_outcomes: labels and groups must be on ", logits.device());
  TORCH_CHECK(num_groups >= 1, "group_outcomes: num_groups must be >= 1, got ", num_groups);
}

// float64 stays float64; every other floating type is computed in float32.
inline at::ScalarType spectrum_compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace shortcut_fast
