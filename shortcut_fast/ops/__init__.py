"""Public ops: argument checks, backend choice and the pure-PyTorch references.

One module per op family: class_spectrum / band_filter / freq (frequency shortcuts), probe_stats /
probe_training / directions (V-information), ablation (channel ablation; the sweep engine built
on it lives in shortcut_fast.surgery).
"""
from shortcut_fast.ops import band_filter as _band_filter  # noqa: F401  (defines its torch.library ops)
from shortcut_fast.ops.ablation import channel_ablate, channel_masks, group_outcomes
from shortcut_fast.ops.directions import Directions, fit_directions, nmf, nnls_codes, pca
from shortcut_fast.ops.probe_training import train_probes
from shortcut_fast.ops.probe_stats import ProbeStats, accumulate_probe_stats, fit_linear_probes, fit_probes, probe_stats
from shortcut_fast.ops.class_spectrum import (
    ClassSpectrum,
    adcs,
    class_spectrum_sum,
    class_spectrum_sum_reference,
)

__all__ = [
    "ClassSpectrum", "adcs", "class_spectrum_sum", "class_spectrum_sum_reference",
    "ProbeStats", "accumulate_probe_stats", "fit_linear_probes", "fit_probes", "probe_stats", "train_probes",
    "Directions", "fit_directions", "nmf", "nnls_codes", "pca",
    "channel_ablate", "channel_masks", "group_outcomes",
]
