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

// The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for, as setup.py passes it (";" and
// spaces turned into "_" so the define survives every compiler command line); "" without CUDA.
#define SHORTCUT_FAST_STR_(...) #__VA_ARGS__
#define SHORTCUT_FAST_STR(...) SHORTCUT_FAST_STR_(__VA_ARGS__)
static std::string cuda_archs() {
#ifdef SHORTCUT_FAST_CUDA_ARCHS
  return SHORTCUT_FAST_STR(SHORTCUT_FAST_CUDA_ARCHS);
#else
  return "";
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
  m.def("cuda_archs", &cuda_archs, "TORCH_CUDA_ARCH_LIST of the CUDA kernels, \"_\"-separated (\"\" without CUDA)");
}
