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
    "data",
    "freq_probe",
    "complexity",
    "memorization",
    "localization",
    "denetdm",
    "pipeline",
]

# The Python API (docs/api.md): sf.data and one module per analysis, each imported on first
# access so that `import shortcut_fast` stays light.
_LAZY_MODULES = {
    "data": "shortcut_fast.data",
    "freq_probe": "shortcut_fast.experiments.freq_probe",
    "complexity": "shortcut_fast.experiments.complexity",
    "memorization": "shortcut_fast.experiments.memorization",
    "localization": "shortcut_fast.experiments.localization",
    "denetdm": "shortcut_fast.experiments.denetdm",
    "pipeline": "shortcut_fast.pipeline",  # prepare(): a dataset and its recipe's model, as the commands get them
}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(_LAZY_MODULES[name])
        globals()[name] = module  # later accesses skip this function
        return module
    raise AttributeError(f"module 'shortcut_fast' has no attribute {name!r}")
