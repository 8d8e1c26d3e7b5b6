// Schemas of every shortcut_fast op (one line each) and the Python module of _C.
// Device kernels register their implementations with TORCH_LIBRARY_IMPL in cpu/ and cuda/.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

TORCH_LIBRARY(shortcut_fast, m) {
  // Sum over images of |fft2(x)|, per label and channel: x (B,C,H,W), labels (B,) -> (K,C,H,W).
  m.def("class_spectrum_sum(Tensor x, Tensor labels, int num_classes) -> Tensor");
  // Every image filtered by every real spectrum weight: x (B,C,H,W), weights (K,H,W) -> (K,B,C,H,W),
  // out[k,b,c] = Re(ifft2(fft2(x[b,c]) * weights[k])); weights conjugate-symmetric.
  m.def("band_filter(Tensor x, Tensor weights) -> Tensor");
  // Each image minus one conjugate frequency pair per row of freqs (K,2) int64 (u,v) -> (K,B,C,H,W).
  m.def("remove_frequencies(Tensor x, Tensor freqs) -> Tensor");
  // Sufficient statistics of linear probes for one chunk: x (N,D), z (N,K), same float dtype ->
  // (x^T x (D,D), x^T z (D,K), sum_n x (D), sum_n z (K), sum_n z^2 (K)), in x's dtype (float32/float64).
  m.def("probe_stats(Tensor x, Tensor z) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Masked channel expansion: act (P,C,S), mask (V,C) bool, replacement (C,) or (P,C,S), act's dtype ->
  // (V,P,C,S) with out[v,p,c,s] = mask[v,c] ? replacement[c] (or [p,c,s]) : act[p,c,s].
  m.def("channel_ablate(Tensor act, Tensor mask, Tensor replacement) -> Tensor");
  // Per-(variant, group) outcomes of classifier logits (V,B,L), labels (B,) and groups (B,) int64 ->
  // (correct (V,G) int64: argmax (first maximum) == label; loss (V,G): summed cross-entropy, float32|float64).
  m.def("group_outcomes(Tensor logits, Tensor labels, Tensor groups, int num_groups) -> (Tensor, Tensor)");
}

static bool cuda_compiled() {
#ifdef SHORTCUT_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

static int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "shortcut_fast compiled ops (registered under torch.ops.shortcut_fast)";
  m.def("cuda_compiled", &cuda_compiled, "whether the CUDA kernels were compiled in");
  m.def("openmp_threads", &openmp_threads, "OpenMP threads available to the CPU kernels");
}
