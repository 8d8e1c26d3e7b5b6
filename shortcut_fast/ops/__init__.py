"""Public ops: argument checks, backend choice and the pure-PyTorch references."""
from shortcut_fast.ops.spectrum import (
    ClassSpectrum,
    adcs,
    class_spectrum_sum,
    class_spectrum_sum_reference,
)

__all__ = ["ClassSpectrum", "adcs", "class_spectrum_sum", "class_spectrum_sum_reference"]
