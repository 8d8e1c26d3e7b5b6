// Argument checks shared by the CPU and CUDA implementations. The Python API checks
// first with friendlier messages; these guard direct torch.ops calls.
#pragma once
#include <torch/extension.h>

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

// float64 stays float64; every other floating type is computed in float32.
inline at::ScalarType spectrum_compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace shortcut_fast
