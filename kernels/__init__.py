"""Triton kernels of shortcut-fast (installed as shortcut_fast.kernels).

Importing this package is cheap and never fails: it records whether triton imports and
whether the interpreter is on. Kernel modules import triton themselves and are loaded
only when the triton backend is chosen. TRITON_INTERPRET=1 must be set before triton is
first imported for the kernels to run on CPU tensors (that is how CI tests them).
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The fewest programs a GPU launch should have where the work is not too small to matter:
# two per SM of an H100 (132 SMs), so no SM idles while another runs a second program.
# tests/test_occupancy.py checks every benchmark size against it. The interpreter pays per
# program, so the launch code asks it for as few as possible.
MIN_PROGRAMS = 2 * 132

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
    TRITON_VERSION = triton.__version__
    TRITON_REASON = "ok"
except ImportError as exc:  # CPU-only installs without triton
    TRITON_AVAILABLE = False
    TRITON_VERSION = None
    TRITON_REASON = f"triton is not installed ({exc})"
