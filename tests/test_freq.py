"""Frequency-grid conventions: bands, mirrors, shifted views."""
import pytest
import torch

from shortcut_fast.ops import freq
from shortcut_fast.ops.freq import band_mask, band_pass, mirror, radial_band_index, shifted, unshifted


def test_radial_band_index():
    band = radial_band_index(32, 32)
    assert band.shape == (32, 32) and band.dtype == torch.int64
    assert band[0, 0] == 0 and band[16, 16] == 3
    assert set(band.unique().tolist()) == {0, 1, 2, 3}
    mirror = band.flip((0, 1)).roll((1, 1), (0, 1))  # band[(-u) % H, (-v) % W]
    assert torch.equal(band, mirror)
    f = torch.fft.fftfreq(32, dtype=torch.float64)
    r = torch.sqrt(f[:, None] ** 2 + f[None] ** 2) / 0.5 ** 0.5
    off_edge = ((r * 4) - (r * 4).round()).abs() > 1e-9
    assert torch.equal(band[off_edge], torch.clamp((r * 4).floor().long(), max=3)[off_edge])
    assert band[4, 4] == 1 and band[4, 3] == 0 and band[-4, 4] == 1  # r = 1/4 exactly: outer band
    odd = radial_band_index(7, 9, n_bands=3)
    assert odd.shape == (7, 9) and odd.max() <= 2


def test_band_pass_bands_sum_to_image():
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    parts = [band_pass(x, [b]) for b in range(4)]
    assert torch.allclose(sum(parts), x, atol=1e-5)
    assert torch.allclose(band_pass(x, [0, 1, 2, 3]), x, atol=1e-5)


def test_mirror_is_the_conjugate_partner():
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(0))
    spectrum = torch.fft.fft2(x)
    torch.testing.assert_close(mirror(spectrum), spectrum.conj())
    assert torch.equal(mirror(mirror(x)), x)


def test_band_masks_partition_the_grid_and_shift_round_trips():
    masks = torch.stack([band_mask(9, 12, b) for b in range(4)])
    assert torch.equal(masks.sum(0), torch.ones(9, 12, dtype=torch.long))
    assert torch.equal(masks, mirror(masks))
    m = torch.randn(9, 12)
    assert torch.equal(unshifted(shifted(m)), m)
    assert shifted(torch.arange(9 * 12).view(9, 12))[4, 6] == 0  # DC in the centre


def test_conjugate_pairs_cover_the_grid_once():
    for H, W in [(8, 8), (7, 10), (1, 5), (32, 32)]:
        pairs = freq.conjugate_pairs(H, W)
        masks = freq.pair_masks(H, W, pairs)
        assert torch.equal(masks.sum(0), torch.ones(H, W, dtype=torch.long))  # a partition
        r = freq.radial_frequency(H, W)[pairs[:, 0], pairs[:, 1]]
        assert bool((r[1:] >= r[:-1]).all()) and pairs[0].tolist() == [0, 0]  # centre outwards


def test_patch_masks_are_symmetric_and_cover_the_grid():
    masks, corners = freq.patch_masks(32, 32, 4)
    assert all(freq.is_conjugate_symmetric(m) for m in masks)
    assert masks.any(0).all()
    assert corners.shape == (masks.shape[0], 2)
    # each mask is one 4x4 patch plus its mirror (which may overlap it or coincide with another patch)
    sizes = masks.flatten(1).sum(1)
    assert bool((sizes >= 16).all() and (sizes <= 32).all()) and masks.shape[0] <= 64
    assert len({m.numpy().tobytes() for m in masks}) == masks.shape[0]  # no duplicates
    odd_masks, _ = freq.patch_masks(9, 9, 3)  # odd grid: patches mirror onto patches
    assert odd_masks.shape[0] == 5
    odd, _ = freq.patch_masks(9, 7, 3)
    assert odd.any(0).all()


def test_radial_masks_and_top_fraction():
    m = freq.radial_masks(16, 16, [0, 0.25, 0.5, 0.75, 1.0])
    assert torch.equal(m, freq.band_masks(16, 16))
    scores = freq.radial_frequency(16, 16)  # symmetric scores
    top = freq.top_fraction_mask(scores, 10)
    assert freq.is_conjugate_symmetric(top)
    assert abs(int(top.sum()) - 26) <= 2 and bool(scores[top].min() >= scores[~top].max())
    with pytest.raises(ValueError, match="percent must be in"):
        freq.top_fraction_mask(scores, 0)
