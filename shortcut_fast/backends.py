"""Backend discovery and choice: the one dispatch mechanism every op uses.

Backends an op may implement:
  torch   the pure-PyTorch reference; always available, any device.
  cpp     the compiled extension (torch.ops.shortcut_fast.*) on CPU tensors.
  cuda    the compiled extension on CUDA tensors (needs a CUDA build of the extension).
  triton  kernels in shortcut_fast.kernels: on CUDA tensors, or on CPU tensors when
          TRITON_INTERPRET=1 was set before triton was first imported.
  auto    the op's preferred order for the tensor's device; never fails for lack of a
          fast path because `torch` is always last.

Naming a backend that cannot run raises BackendUnavailable with the reason.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

BACKENDS = ("auto", "torch", "cpp", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """Raised when a backend named explicitly cannot run the requested op."""


@dataclass(frozen=True)
class Status:
    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# The op schemas live here, in Python (torchao style): each op module declares its
# compiled op with @define_op right under its wrapper, the fake (shape function) being the
# decorated function. _C only registers implementations (TORCH_LIBRARY_IMPL), so every op
# traces under torch.compile with or without the extension, and the dispatcher accepts
# the implementations whether _C loads before or after the schemas are defined.
NAMESPACE = "shortcut_fast"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def define_op(schema: str):
    """Define torch.ops.shortcut_fast.<name> from `schema`; decorate its fake with this."""
    name = schema.split("(", 1)[0].strip()
    LIBRARY.define(schema)

    def decorate(fake):
        torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
        return fake

    return decorate


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import shortcut_fast._C once; return (module or None, reason)."""
    if _env_flag("SHORTCUT_FAST_NO_EXT"):
        return None, "disabled by SHORTCUT_FAST_NO_EXT=1"
    try:
        module = importlib.import_module("shortcut_fast._C")
    except ImportError as exc:  # not built, or built against another torch
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "No module named" in msg:
            msg = "not built (install with `pip install --no-build-isolation -e .`)"
        return None, f"extension unavailable: {msg}"
    except RuntimeError as exc:  # e.g. a _C built from older sources that still defines schemas
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"extension unavailable: {msg} (rebuild it: `pip install --no-build-isolation -e .`)"
    return module, "loaded"


def extension():
    """The compiled extension module, or None."""
    return _load_extension()[0]


def extension_status() -> Status:
    module, reason = _load_extension()
    return Status(module is not None, reason)


def extension_has_cuda() -> bool:
    module = extension()
    return bool(module is not None and module.cuda_compiled())


def extension_cuda_archs() -> str | None:
    """The TORCH_CUDA_ARCH_LIST the extension's CUDA kernels were built for (e.g.
    "8.0;9.0+PTX"); None without CUDA kernels, "unknown" for a build that predates the record."""
    if not extension_has_cuda():
        return None
    module = extension()
    if not hasattr(module, "cuda_archs"):
        return "unknown"
    return module.cuda_archs().replace("_", ";") or "unknown"


@functools.lru_cache(maxsize=None)
def triton_status() -> Status:
    """Whether shortcut_fast.kernels can be imported (it imports triton)."""
    if _env_flag("SHORTCUT_FAST_NO_TRITON"):
        return Status(False, "disabled by SHORTCUT_FAST_NO_TRITON=1")
    try:
        from shortcut_fast import kernels
    except ImportError as exc:
        return Status(False, f"shortcut_fast.kernels cannot be imported: {exc}")
    if not kernels.TRITON_AVAILABLE:
        return Status(False, kernels.TRITON_REASON)
    mode = "interpreter (TRITON_INTERPRET=1)" if kernels.INTERPRET else "compiled"
    return Status(True, f"triton {kernels.TRITON_VERSION}, {mode}")


def backend_status(backend: str, device: torch.device | str) -> Status:
    """Can `backend` run on tensors of `device` in this process? (op-independent)"""
    device = torch.device(device)
    if backend == "torch":
        return Status(True, "pure PyTorch reference")
    if backend == "cpp":
        if device.type != "cpu":
            return Status(False, f"cpp runs on CPU tensors, got a {device.type} tensor")
        return extension_status()
    if backend == "cuda":
        if device.type != "cuda":
            return Status(False, f"cuda needs CUDA tensors, got a {device.type} tensor")
        ext = extension_status()
        if not ext:
            return ext
        if not extension_has_cuda():
            return Status(False, "the extension was built without CUDA (no matching toolkit at build time)")
        return Status(True, "compiled CUDA kernels")
    if backend == "triton":
        status = triton_status()
        if not status:
            return status
        from shortcut_fast import kernels

        if device.type == "cuda":
            if kernels.INTERPRET:
                return Status(False, "TRITON_INTERPRET=1 is set: kernels run on CPU tensors only")
            return status
        if device.type == "cpu":
            if not kernels.INTERPRET:
                return Status(False, "triton on CPU tensors needs TRITON_INTERPRET=1 set before import")
            return status
        return Status(False, f"triton does not run on {device.type} tensors")
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its `import torch._dynamo` (with triton,
    seconds at import): in this torch the decorator only sets this flag, which the compiler
    reads when it traces a call (tests/test_startup.py checks the two still agree)."""
    fn._dynamo_marked_constant = True
    return fn


# Per-device order `auto` tries when an op does not give its own.
DEFAULT_AUTO_ORDER: Mapping[str, Sequence[str]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}


# The choice depends only on the build, the device and static facts about the inputs, so
# torch.compile may treat it as a constant instead of tracing the discovery code.
@_assume_constant_result
def choose_backend(
    op: str,
    requested: str,
    device: torch.device | str,
    implemented: Sequence[str],
    *,
    auto_order: Mapping[str, Sequence[str]] | None = None,
    unsupported: Mapping[str, str] | None = None,
) -> str:
    """Resolve `requested` to the backend that will run `op` on `device`.

    implemented: backends the op has. unsupported: backend -> reason it cannot take these
    particular inputs (dtype, size...). Explicit requests that cannot run raise
    BackendUnavailable naming the reason; `auto` falls through to `torch`.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    device = torch.device(device)
    unsupported = dict(unsupported or {})

    def usable(name: str) -> Status:
        if name not in implemented:
            return Status(False, f"{op} has no {name} implementation (has: {', '.join(implemented)})")
        if name in unsupported:
            return Status(False, unsupported[name])
        status = backend_status(name, device)
        if status and name in ("cpp", "cuda") and not compiled_has_kernel(op, name):
            return Status(False, f"the compiled extension has no op {op} for {_DISPATCH_KEYS[name]} "
                                 f"tensors (rebuild it)")
        return status

    if requested != "auto":
        status = usable(requested)
        if not status:
            raise BackendUnavailable(f"{op}: backend {requested!r} is unavailable: {status.reason}")
        return requested
    order = (auto_order or DEFAULT_AUTO_ORDER).get(device.type, ("torch",))
    for name in order:
        if usable(name):
            return name
    return "torch"


_DISPATCH_KEYS = {"cpp": "CPU", "cuda": "CUDA"}


def compiled_has_kernel(op: str, backend: str) -> bool:
    """Whether _C registered a kernel of torch.ops.shortcut_fast.<op> for `backend`'s
    device (the schema exists without _C, so its presence proves nothing)."""
    if extension() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", _DISPATCH_KEYS[backend])
    except RuntimeError:  # no such operator at all
        return False


def dispatch(op: str, requested: str, device: torch.device | str, impls: Mapping[str, Callable], *,
             auto_order: Mapping[str, Sequence[str]] | None = None,
             unsupported: Mapping[str, str] | None = None) -> Callable:
    """The implementation of `op` that `requested` resolves to on `device`.

    impls: backend name -> callable, all with the same signature; its keys are the
    backends the op implements (see choose_backend for the rest).
    """
    chosen = choose_backend(op, requested, device, tuple(impls), auto_order=auto_order, unsupported=unsupported)
    return impls[chosen]


def compiled_op(name: str) -> Callable:
    """Calls torch.ops.shortcut_fast.<name> (the _C kernel for the inputs' device)."""

    def run(*args):
        return getattr(torch.ops.shortcut_fast, name)(*args)

    run.__name__ = f"compiled_{name}"
    return run


# Importing a kernel module defines its triton ops. Run eagerly even under torch.compile
# (dynamo cannot trace importlib); the True it returns is all the trace keeps.
@_assume_constant_result
def _import_kernels(module: str) -> bool:
    importlib.import_module(f"shortcut_fast.kernels.{module}")
    return True


def triton_kernel(module: str, op: str) -> Callable:
    """Calls torch.ops.shortcut_fast.<op>, the triton_op that shortcut_fast.kernels.<module>
    defines; the module (it imports triton) is imported on first use."""

    def run(*args):
        _import_kernels(module)
        return getattr(torch.ops.shortcut_fast, op)(*args)

    run.__name__ = f"triton_{op}"
    return run


def package_version() -> str:
    """shortcut-fast's installed version ("unknown" in a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shortcut-fast")
    except PackageNotFoundError:
        return "unknown"


def info() -> dict:
    """Versions, devices and which backends are usable (and why not) on each device."""
    __version__ = package_version()
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    result = {
        "shortcut_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "extension": extension_status().reason,
        "extension_cuda": extension_has_cuda(),
        "backends": {},
    }
    module = extension()
    if module is not None:
        result["extension_openmp_threads"] = module.openmp_threads()
        result["extension_cuda_archs"] = extension_cuda_archs()
    for dev in devices:
        result["backends"][dev] = {
            name: {"usable": bool(s), "reason": s.reason}
            for name in BACKENDS[1:]
            for s in [backend_status(name, dev)]
        }
    return result


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__
