// The Python module of _C. The op schemas and fakes are declared once, in Python
// (shortcut_fast/ops/*.py through backends.define_op); cpu/*.cpp and cuda/*.cu only register
// implementations with TORCH_LIBRARY_IMPL(shortcut_fast, CPU|CUDA, m), which the dispatcher
// accepts before or after the Python definitions.
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

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
