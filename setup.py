"""Build of shortcut_fast._C.

The C++ (CPU) part is always built when a C++ compiler exists; the CUDA part whenever a
CUDA toolkit whose major version matches torch's CUDA build is found. Environment knobs:

  SHORTCUT_FAST_NO_EXT=1     build nothing; the package runs on its PyTorch fallbacks
  SHORTCUT_FAST_CUDA=auto    (default) CUDA when a matching toolkit is found
  SHORTCUT_FAST_CUDA=0       C++ only
  SHORTCUT_FAST_CUDA=1       CUDA required: fail the build if it cannot be compiled
  TORCH_CUDA_ARCH_LIST       defaults to the visible GPUs' archs + PTX, or without a GPU to
                             "8.0;9.0+PTX" (A100, H100/H200, PTX for newer cards); the list
                             built is recorded in the extension (backends.info())

Install with `pip install --no-build-isolation -e .` so the build sees the installed torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = ["shortcut_fast", "shortcut_fast.kernels", "shortcut_fast.bench"] + [
    "shortcut_fast." + p for p in ("ops", "data", "models", "surgery", "experiments")
]
PACKAGE_DIR = {"shortcut_fast.kernels": "kernels", "shortcut_fast.bench": "bench"}


def _log(msg):
    print(f"[shortcut-fast setup] {msg}", file=sys.stderr)


def _find_cuda_home():
    """The toolkit root (the folder holding bin/nvcc), not the folder of an nvcc wrapper."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        path = os.environ.get(var)
        if path and os.path.exists(os.path.join(path, "bin", "nvcc")):
            return path
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A shell wrapper (`exec /usr/local/cuda-X/bin/nvcc "$@"`) hides the real root.
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            m = re.search(r"(/\S+)/bin/nvcc", head)
            if m:
                candidates.append(m.group(1))
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for path in candidates:
        # A real toolkit root has the runtime headers next to bin/nvcc.
        if os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
            os.path.join(path, "include", "cuda_runtime.h")
        ):
            return path
    return None


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _default_arch_list(torch):
    """The visible GPUs' compute capabilities + PTX; without a GPU sm_80 (A100), sm_90
    (H100/H200) and PTX of sm_90 that newer cards compile at load time."""
    try:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except (RuntimeError, AssertionError):  # no usable driver
        caps = []
    if not caps:
        return "8.0;9.0+PTX"
    return ";".join(f"{major}.{minor}" for major, minor in caps) + "+PTX"


def _want_cuda():
    mode = os.environ.get("SHORTCUT_FAST_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        return False, "SHORTCUT_FAST_CUDA=0"
    required = mode in ("1", "true", "yes", "on")
    import torch

    reason = None
    cuda_home = _find_cuda_home()
    if torch.version.cuda is None:
        reason = "this torch is a CPU-only build"
    elif cuda_home is None:
        reason = "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    else:
        nvcc = _nvcc_version(cuda_home)
        torch_major = int(torch.version.cuda.split(".")[0])
        if nvcc is None:
            reason = f"could not run {cuda_home}/bin/nvcc"
        elif nvcc[0] != torch_major:
            reason = f"nvcc {nvcc[0]}.{nvcc[1]} does not match torch's CUDA {torch.version.cuda}"
    if reason:
        if required:
            raise SystemExit(f"SHORTCUT_FAST_CUDA=1 but CUDA cannot be built: {reason}")
        return False, reason
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension is imported
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list(torch))
    return True, f"CUDA toolkit at {cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']}"


def _extensions():
    if os.environ.get("SHORTCUT_FAST_NO_EXT", "0") not in ("", "0"):
        _log("SHORTCUT_FAST_NO_EXT is set: no compiled extension, PyTorch fallbacks only")
        return [], {}
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        _log("no C++ compiler found: no compiled extension, PyTorch fallbacks only")
        return [], {}
    use_cuda, why = _want_cuda()
    _log(("building with CUDA: " if use_cuda else "building C++ only: ") + why)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    define_macros = []
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("SHORTCUT_FAST_WITH_CUDA", "1"))
        # Read back by _C.cuda_archs(); "_" for ";" and spaces, which a shell would split on.
        archs = "_".join(re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"].strip()))
        define_macros.append(("SHORTCUT_FAST_CUDA_ARCHS", archs))
        ext = CUDAExtension(
            "shortcut_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "shortcut_fast._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
