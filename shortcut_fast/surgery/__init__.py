"""Model surgery: cut a model at an ablation point and sweep channel ablations over it.

A layer above ops/ and models/: it uses both (ops.ablation's kernels, models.introspect),
neither imports it; experiments/ build on it.

  split   `split_model`: the fx split into a once-per-batch prefix and a suffix run on many
          modified copies (with a hook fallback), `SplitModel.verify`.
  sweep   `channel_ablation_sweep` (the fast engine, resumable through a run_folder.Store),
          `channel_ablation_reference` (the hook loop it must equal), and the cheaper
          importance scores `weight_norm_scores` / `gradient_norm_scores`.
"""
from shortcut_fast.surgery.split import METHODS, WHERE, Prefix, SplitModel, split_model
from shortcut_fast.surgery.sweep import (
    MODES,
    LayerSweep,
    SweepResult,
    channel_ablation_reference,
    channel_ablation_sweep,
    gradient_norm_scores,
    weight_norm_scores,
)

__all__ = [
    "METHODS", "WHERE", "Prefix", "SplitModel", "split_model",
    "MODES", "LayerSweep", "SweepResult", "channel_ablation_reference", "channel_ablation_sweep",
    "gradient_norm_scores", "weight_norm_scores",
]
