"""Frequency-grid conventions shared by every op, dataset and figure.

Maps live on the unshifted torch.fft.fft2 grid: index (u, v), u in [0, H), v in [0, W);
frequency u corresponds to fftfreq(H)[u] cycles per pixel (negative past H/2). Figures use
the fftshift-ed view with DC in the centre.
"""
from __future__ import annotations

import torch


def shifted(freq_map: torch.Tensor) -> torch.Tensor:
    """fftshift over the last two dimensions: DC to the centre, for plots."""
    return torch.fft.fftshift(freq_map, dim=(-2, -1))


def unshifted(freq_map: torch.Tensor) -> torch.Tensor:
    """Inverse of `shifted`."""
    return torch.fft.ifftshift(freq_map, dim=(-2, -1))
