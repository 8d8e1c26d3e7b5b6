"""shortcut-fast: fast experiments on shortcut learning.

Import is light: ops, data and models load their heavy dependencies when first used.
"""
__version__ = "0.1.0"

from shortcut_fast.backends import BackendUnavailable, info  # noqa: E402
from shortcut_fast.ops import (  # noqa: E402
    ClassSpectrum,
    ProbeStats,
    adcs,
    class_spectrum_sum,
    fit_linear_probes,
    fit_probes,
    train_probes,
)
from shortcut_fast.surgery import channel_ablation_sweep  # noqa: E402

__all__ = [
    "__version__",
    "BackendUnavailable",
    "info",
    "ClassSpectrum",
    "adcs",
    "class_spectrum_sum",
    "ProbeStats",
    "fit_linear_probes",
    "fit_probes",
    "train_probes",
    "channel_ablation_sweep",
]
