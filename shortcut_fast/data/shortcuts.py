"""Planted shortcuts (docs/experiments.md#layer-wise-localization): a class-specific patch, color tint or frequency.

Protocol of inject_shortcut. Shortcut attribute a in 0..C-1 means "carries the shortcut of
class a"; a = C (= num_classes) means "no shortcut", so num_attributes = C + 1 and an image is
aligned when a == label.
- train, val: in each class, after a seeded shuffle, round(rho * n_c) images carry their own
  class's shortcut; the rest carry none.
- test: clean (a = C). extra: "clean" (the same), "aligned" (every test image with its own
  class's shortcut), "conflicting" (every test image with the shortcut of another class,
  drawn uniformly with a seed).
The base dataset's own attributes and extra sets are replaced.

Shortcut kinds (value range [lo, hi] = [0, 255] for uint8 images; for float images the
1%/99% quantiles of the training pixels):
- patch: an s x s square, s = max(2, round(min(H, W) / 8)) (4 px at 32 px), at a
  class-specific grid cell (distinct cells, chosen with the seed), in a class-specific
  color; strength = opacity in (0, 1] (default 1: the square replaces the pixels).
- tint: x + strength * (hi - lo) * (2 * color_c - 1) on every pixel (default strength 0.15).
- freq: x + strength * (hi - lo) * cos(2 pi (u_c y / H + v_c x / W) + phase_c) on every channel:
  a single conjugate pair (u_c, v_c) of the torch.fft.fft2 grid per class, distinct pairs,
  none self-conjugate, normalized radius in [0.15, 0.85] (default strength 0.1).
Colors: for 3 channels the 10 LfF colors (then random ones), for 1 channel evenly spaced gray
levels, assigned to classes by a seeded permutation. uint8 results are rounded and clamped to
[0, 255]; float results are not clamped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .colored import LFF_COLORS
from .core import DatasetSplits, FileImageDataset, ImageDataset, make_generator, rank_within_class
from shortcut_fast.validate import check_int
from shortcut_fast.ops.freq import radial_frequency

__all__ = ["SHORTCUT_KINDS", "DEFAULT_STRENGTH", "Shortcut", "make_shortcut", "inject_shortcut"]

SHORTCUT_KINDS = ("patch", "tint", "freq")
DEFAULT_STRENGTH = {"patch": 1.0, "tint": 0.15, "freq": 0.1}


@dataclass
class Shortcut:
    """Per-class shortcut parameters; `apply` plants them into images."""

    kind: str
    num_classes: int
    image_shape: tuple
    strength: float
    value_range: tuple  # (lo, hi) pixel values
    colors: torch.Tensor  # (C, channels) in [0, 1]
    patch_size: int = 0
    positions: torch.Tensor | None = None  # (C, 2) top-left (row, col) of the patch
    frequencies: torch.Tensor | None = None  # (C, 2) (u, v) on the fft2 grid
    phases: torch.Tensor | None = None  # (C,)

    def apply(self, images: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        """A copy of images (N,C,H,W) with class a's shortcut where attributes == a (a = C: none)."""
        if tuple(images.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"images must have shape (N, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(images.shape)}")
        attributes = torch.as_tensor(attributes).long().to(images.device)
        if attributes.shape != images.shape[:1]:
            raise ValueError(f"attributes must have shape ({images.shape[0]},), got {tuple(attributes.shape)}")
        if attributes.numel() and (int(attributes.min()) < 0 or int(attributes.max()) > self.num_classes):
            raise ValueError(f"attributes must lie in [0, {self.num_classes}] ({self.num_classes} = no shortcut)")
        if self.kind == "patch":
            return self._apply_patch(images, attributes)
        # tint / freq: an additive per-class delta; row C (no shortcut) is zero. Chunks bound the
        # memory of the gathered per-sample deltas.
        if self.kind == "tint":
            span = self.value_range[1] - self.value_range[0]
            table = (self.strength * span * (2 * self.colors - 1))[:, :, None, None]
        else:
            table = torch.stack([self.grating(c) for c in range(self.num_classes)])[:, None]
        table = torch.cat([table, torch.zeros_like(table[:1])]).to(images.device)
        out = torch.empty_like(images)
        for start in range(0, images.shape[0], 8192):
            sl = slice(start, start + 8192)
            out[sl] = self._cast(images[sl].to(torch.float32, copy=True).add_(table[attributes[sl]]), images.dtype)
        return out

    def _apply_patch(self, images, attributes):
        out = images.clone()
        lo, hi = self.value_range
        s = self.patch_size
        for c in range(self.num_classes):  # a loop over classes; each is one vectorized update
            sel = (attributes == c).nonzero().flatten()
            if sel.numel() == 0:
                continue
            color = (lo + (hi - lo) * self.colors[c]).to(images.device)[None, :, None, None]
            r, q = (int(v) for v in self.positions[c])
            region = out[sel, :, r:r + s, q:q + s].float()
            out[sel, :, r:r + s, q:q + s] = self._cast((1 - self.strength) * region + self.strength * color,
                                                       images.dtype)
        return out

    def grating(self, c: int) -> torch.Tensor:
        """The (H, W) float32 pattern added by the freq shortcut of class c."""
        _, H, W = self.image_shape
        u, v = (float(t) for t in self.frequencies[c])
        y = torch.arange(H, dtype=torch.float64)[:, None]
        x = torch.arange(W, dtype=torch.float64)[None, :]
        amp = self.strength * (self.value_range[1] - self.value_range[0])
        return (amp * torch.cos(2 * math.pi * (u * y / H + v * x / W) + float(self.phases[c]))).float()

    @staticmethod
    def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x is a temporary, so it is rounded and clamped in place."""
        return x.round_().clamp_(0, 255).to(dtype) if dtype == torch.uint8 else x.to(dtype)

    def to_meta(self) -> dict:
        meta = {"kind": self.kind, "strength": self.strength, "value_range": list(self.value_range),
                "colors": self.colors.tolist()}
        if self.kind == "patch":
            meta.update(patch_size=self.patch_size, positions=self.positions.tolist())
        if self.kind == "freq":
            meta.update(frequencies=self.frequencies.tolist(), phases=self.phases.tolist())
        return meta


def _palette(num_classes: int, channels: int, g: torch.Generator) -> torch.Tensor:
    if channels == 1:
        base = torch.linspace(0, 1, num_classes)[:, None]
    elif channels == 3:
        extra = torch.rand(max(num_classes - len(LFF_COLORS), 0), 3, generator=g)
        base = torch.cat([LFF_COLORS, extra])[:num_classes]
    else:
        base = torch.rand(num_classes, channels, generator=g)
    return base[torch.randperm(num_classes, generator=g)]


def make_shortcut(kind: str, num_classes: int, image_shape, *, seed: int = 0, strength: float | None = None,
                  value_range=(0.0, 1.0)) -> Shortcut:
    """Draw the per-class parameters of a shortcut (see the module docstring)."""
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SHORTCUT_KINDS)}, got {kind!r}")
    check_int("num_classes", num_classes, 2)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}")
    channels, H, W = (int(s) for s in image_shape)
    strength = DEFAULT_STRENGTH[kind] if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or strength <= 0 or (kind == "patch" and strength > 1):
        valid = "(0, 1] (the patch opacity)" if kind == "patch" else "a finite number > 0"
        raise ValueError(f"strength for {kind!r} must be {valid}, got {strength!r}")
    g = make_generator(seed, 200 + SHORTCUT_KINDS.index(kind))
    sc = Shortcut(kind=kind, num_classes=num_classes, image_shape=(channels, H, W), strength=float(strength),
                  value_range=(float(value_range[0]), float(value_range[1])),
                  colors=_palette(num_classes, channels, g))
    if kind == "patch":
        s = max(2, round(min(H, W) / 8))
        rows, cols = H // s, W // s
        if rows * cols < num_classes:
            raise ValueError(f"images of {H}x{W} px have room for {rows * cols} distinct {s}x{s} patches, "
                             f"fewer than num_classes={num_classes}")
        cells = torch.randperm(rows * cols, generator=g)[:num_classes]
        sc.patch_size = s
        sc.positions = torch.stack([cells // cols * s, cells % cols * s], dim=1)
    elif kind == "freq":
        u = torch.arange(H)[:, None].expand(H, W)
        v = torch.arange(W)[None, :].expand(H, W)
        mu, mv = (-u) % H, (-v) % W
        # one representative per conjugate pair, no self-conjugate frequency, mid radius
        rep = (u * W + v) < (mu * W + mv)
        r = radial_frequency(H, W)
        ok = rep & (r >= 0.15) & (r <= 0.85)
        cand = ok.flatten().nonzero().flatten()
        if cand.numel() < num_classes:
            raise ValueError(f"images of {H}x{W} px have {cand.numel()} usable frequencies, "
                             f"fewer than num_classes={num_classes}")
        pick = cand[torch.randperm(cand.numel(), generator=g)[:num_classes]]
        sc.frequencies = torch.stack([pick // W, pick % W], dim=1)
        sc.phases = torch.rand(num_classes, generator=g, dtype=torch.float64) * 2 * math.pi
    return sc


def _value_range(ds: ImageDataset) -> tuple[float, float]:
    if ds.images.dtype == torch.uint8:
        return 0.0, 255.0
    flat = ds.images.flatten()
    flat = flat[:: max(1, flat.numel() // 1_000_000)].float()  # quantile on a strided sample: fast
    lo, hi = torch.quantile(flat, torch.tensor([0.01, 0.99], device=flat.device)).tolist()
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def inject_shortcut(splits: DatasetSplits, kind: str = "patch", rho: float = 0.9, seed: int = 0,
                    strength: float | None = None) -> DatasetSplits:
    """Plant a class-specific shortcut into an in-memory dataset (see the module docstring)."""
    for key in ("train", "val", "test"):
        ds = getattr(splits, key)
        if not isinstance(ds, ImageDataset):
            hint = " (load it with in_memory=True or call .load_into_memory())" \
                if isinstance(ds, FileImageDataset) else ""
            raise TypeError(f"inject_shortcut needs in-memory ImageDataset splits; {key!r} is a "
                            f"{type(ds).__name__}{hint}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho <= 1:
        raise ValueError(f"rho must be a number in [0, 1], got {rho!r}")
    C = splits.num_classes
    train = splits.train
    sc = make_shortcut(kind, C, train.image_shape, seed=seed, strength=strength, value_range=_value_range(train))
    name = f"{splits.name}+{kind}"

    def make(ds: ImageDataset, attributes: torch.Tensor) -> ImageDataset:
        attributes = attributes.to(ds.device)
        return ImageDataset(sc.apply(ds.images, attributes), ds.labels, attributes, num_classes=C,
                            num_attributes=C + 1, name=name)

    def skewed(ds: ImageDataset, salt: int) -> ImageDataset:
        labels = ds.labels.cpu()
        if len(labels) == 0:
            return make(ds, labels.clone())
        rank, counts = rank_within_class(labels, make_generator(seed, salt))
        n_short = torch.floor(counts.double() * rho + 0.5).long()
        return make(ds, torch.where(rank < n_short[labels], labels, torch.full_like(labels, C)))

    test = splits.test
    y = test.labels.cpu()
    clean = ImageDataset(test.images, test.labels, torch.full_like(y, C), num_classes=C, num_attributes=C + 1,
                         name=name)
    other = (y + torch.randint(1, C, y.shape, generator=make_generator(seed, 303))) % C
    meta = dict(splits.meta)
    meta["shortcut"] = {**sc.to_meta(), "rho": rho, "seed": seed,
                        "attribute": f"class whose shortcut the image carries; {C} = none"}
    return replace(splits, name=name, train=skewed(train, 301), val=skewed(splits.val, 302), test=clean,
                   extra={"clean": clean, "aligned": make(test, y), "conflicting": make(test, other)},
                   num_attributes=C + 1, bias_aligned_attribute=True, meta=meta)
