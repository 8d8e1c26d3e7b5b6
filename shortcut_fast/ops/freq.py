"""Frequency-grid conventions shared by every op, dataset and figure.

Maps live on the unshifted torch.fft.fft2 grid: index (u, v), u in [0, H), v in [0, W);
frequency u corresponds to fftfreq(H)[u] cycles per pixel (negative past H/2). Figures use
the fftshift-ed view with DC in the centre.
"""
from __future__ import annotations

import math

import torch

from shortcut_fast.validate import check_int

# Radial bands: frequency (u, v) has fy = fftfreq(H)[u], fx = fftfreq(W)[v] cycles per pixel
# and normalized radius r = sqrt(fy^2 + fx^2) / sqrt(0.5): 0 at DC, 1 at the (Nyquist,
# Nyquist) corner. With n bands of equal radial width, band k holds r in [k/n, (k+1)/n)
# (the last band also takes r = 1; a frequency exactly on an edge goes to the outer band).
# r depends on |f| only, so every band is conjugate-symmetric.



def shifted(freq_map: torch.Tensor) -> torch.Tensor:
    """fftshift over the last two dimensions: DC to the centre, for plots."""
    return torch.fft.fftshift(freq_map, dim=(-2, -1))


def unshifted(freq_map: torch.Tensor) -> torch.Tensor:
    """Inverse of `shifted`."""
    return torch.fft.ifftshift(freq_map, dim=(-2, -1))


def radial_frequency(H: int, W: int) -> torch.Tensor:
    """Normalized radius r (H, W) float64 of every unshifted fft2 frequency: 0 at DC, 1 at the corner."""
    check_int("H", H)
    check_int("W", W)
    fy = torch.fft.fftfreq(H, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(W, dtype=torch.float64)[None, :]
    return torch.sqrt(fy ** 2 + fx ** 2) / math.sqrt(0.5)


def radial_band_index(H: int, W: int, n_bands: int = 4) -> torch.Tensor:
    """Band index (H, W) int64 in [0, n_bands) of every unshifted fft2 frequency (DC in band 0).

    Bands have equal width on the normalized radius (see the module docstring); a frequency
    exactly on an edge belongs to the outer band. The comparison is done in exact integer
    arithmetic, since grid points do land on edges (e.g. (4, 4) at 32 x 32 has r = 1/4).
    """
    check_int("n_bands", n_bands)
    check_int("H", H)
    check_int("W", W)
    # signed frequency indices: fy = uy / H, fx = vx / W
    uy = torch.fft.fftfreq(H, d=1.0 / H).round().long()[:, None]
    vx = torch.fft.fftfreq(W, d=1.0 / W).round().long()[None, :]
    # r >= k / n  <=>  2 n^2 (uy^2 W^2 + vx^2 H^2) >= k^2 H^2 W^2
    lhs = 2 * n_bands ** 2 * (uy ** 2 * W ** 2 + vx ** 2 * H ** 2)
    band = torch.zeros(H, W, dtype=torch.long)
    for k in range(1, n_bands):
        band += (lhs >= k ** 2 * H ** 2 * W ** 2).long()
    return band


def band_edges(n_bands: int = 4) -> list[float]:
    """Band edges on the normalized radius: [0, 1/n, ..., 1]; times sqrt(0.5) gives cycles/pixel."""
    check_int("n_bands", n_bands)
    return [k / n_bands for k in range(n_bands + 1)]


def band_mask(H: int, W: int, bands, n_bands: int = 4) -> torch.Tensor:
    """Boolean (H, W) mask of the frequencies in `bands` (an int or an iterable of band indices)."""
    bands = [bands] if isinstance(bands, int) else list(bands)
    for b in bands:
        if not isinstance(b, int) or not 0 <= b < n_bands:
            raise ValueError(f"bands must be ints in [0, {n_bands}), got {bands!r}")
    index = radial_band_index(H, W, n_bands)
    mask = torch.zeros(H, W, dtype=torch.bool)
    for b in bands:
        mask |= index == b
    return mask


def band_pass(images: torch.Tensor, keep, n_bands: int = 4) -> torch.Tensor:
    """Keep only the frequencies of bands `keep` in real images (..., H, W); float32 result.

    Band-stop of band b is band_pass(x, [every band but b]).
    """
    if images.dim() < 2:
        raise ValueError(f"images must have shape (..., H, W), got {tuple(images.shape)}")
    H, W = images.shape[-2:]
    mask = band_mask(H, W, keep, n_bands).to(images.device)
    x = images.float()
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real


def mirror(z: torch.Tensor) -> torch.Tensor:
    """z[..., (-u) mod H, (-v) mod W]: the conjugate partner of every frequency."""
    return z.flip((-2, -1)).roll((1, 1), (-2, -1))


def band_masks(H: int, W: int, n_bands: int = 4) -> torch.Tensor:
    """(n_bands, H, W) bool: the equal-width radial bands B1..Bn (they partition the grid)."""
    index = radial_band_index(H, W, n_bands)
    return index[None] == torch.arange(n_bands)[:, None, None]


def radial_masks(H: int, W: int, edges) -> torch.Tensor:
    """(K, H, W) bool radial bands with arbitrary edges on the normalized radius.

    Band k holds r in [edges[k], edges[k+1]); the last band also takes r == edges[-1].
    """
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must be at least two increasing numbers, got {edges!r}")
    r = radial_frequency(H, W)
    eps = 1e-12  # grid points that land on an edge go to the outer band, as in radial_band_index
    masks = [(r >= lo - eps) & (r < hi - eps) for lo, hi in zip(edges[:-1], edges[1:])]
    masks[-1] |= (r - edges[-1]).abs() <= eps
    return torch.stack(masks)


def is_conjugate_symmetric(mask: torch.Tensor) -> bool:
    """True when mask[u, v] == mask[-u, -v] everywhere (so filtered real images stay real)."""
    return bool(torch.equal(mask, mirror(mask)))


def symmetrize(mask: torch.Tensor) -> torch.Tensor:
    """The conjugate-symmetric version of a mask: boolean masks keep a frequency when either
    it or its partner is kept; weighted masks average the two weights."""
    if mask.dtype == torch.bool:
        return mask | mirror(mask)
    return 0.5 * (mask + mirror(mask))


def conjugate_pairs(H: int, W: int) -> torch.Tensor:
    """(P, 2) int64: one (u, v) per conjugate pair {(u, v), (-u, -v)} of the H x W grid,
    ordered from the centre (DC) outwards by radius, ties by (u, v). Self-conjugate
    frequencies (DC, Nyquist lines) form pairs of one."""
    check_int("H", H)
    check_int("W", W)
    u = torch.arange(H)[:, None].expand(H, W)
    v = torch.arange(W)[None, :].expand(H, W)
    index = u * W + v
    partner = mirror(index)
    keep = (index <= partner).flatten()
    r = radial_frequency(H, W).flatten()[keep]
    flat = index.flatten()[keep]
    order = sorted(range(flat.numel()), key=lambda i: (float(r[i]), int(flat[i])))
    flat = flat[torch.tensor(order, dtype=torch.long)]
    return torch.stack([flat // W, flat % W], dim=1)


def pair_masks(H: int, W: int, pairs: torch.Tensor) -> torch.Tensor:
    """(K, H, W) bool: mask k holds frequency pairs[k] and its conjugate partner."""
    pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
    masks = torch.zeros(pairs.shape[0], H, W, dtype=torch.bool)
    k = torch.arange(pairs.shape[0])
    masks[k, pairs[:, 0] % H, pairs[:, 1] % W] = True
    masks[k, (-pairs[:, 0]) % H, (-pairs[:, 1]) % W] = True
    return masks


def patch_masks(H: int, W: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The p x p patches of the fftshift-ed spectrum, each joined with its conjugate mirror.

    Returns (masks (K, H, W) bool on the unshifted grid, corners (K, 2) int64 top-left
    (row, col) of the patch in the shifted view). A patch and its mirror give the same
    mask, so each such pair appears once (the first in row-major order of the shifted view).
    """
    check_int("patch", patch)
    if patch > min(H, W):
        raise ValueError(f"patch must be <= min(H, W) = {min(H, W)}, got {patch}")
    masks, corners, seen = [], [], set()
    for row in range(0, H, patch):
        for col in range(0, W, patch):
            shifted_mask = torch.zeros(H, W, dtype=torch.bool)
            shifted_mask[row:row + patch, col:col + patch] = True
            mask = symmetrize(unshifted(shifted_mask))
            key = mask.numpy().tobytes()
            if key in seen:
                continue
            seen.add(key)
            masks.append(mask)
            corners.append((row, col))
    return torch.stack(masks), torch.tensor(corners, dtype=torch.long)


def top_fraction_mask(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """(H, W) bool keeping the top `percent` % of frequencies by score, made conjugate-
    symmetric (a DFM). Scores should already be symmetric (pairs scored together)."""
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    flat = scores.flatten()
    k = max(1, round(flat.numel() * percent / 100))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k).indices] = True
    return symmetrize(mask.view_as(scores))
