"""Small statistics shared by the experiments (one home each)."""
from __future__ import annotations

import math

import torch


def spearman(a, b) -> float:
    """scipy's Spearman rank correlation (average ranks on ties) of two equal-length vectors,
    pairs with a NaN left out; NaN when fewer than 2 pairs remain or one side is constant."""
    import numpy as np
    from scipy.stats import spearmanr

    a = torch.as_tensor(a, dtype=torch.float64).flatten().numpy()
    b = torch.as_tensor(b, dtype=torch.float64).flatten().numpy()
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(spearmanr(a, b).statistic)
