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

// float64 stays float64; every other floating type is computed in float32.
inline at::ScalarType spectrum_compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace shortcut_fast
