"""Image corruptions for OOD tests and corruption-biased data (CIFAR-10-C style, in torch).

Every corruption maps images (N, C, H, W) with values in value_range to the same range,
with a severity 1..5 and a seed. Names: gaussian-noise, shot-noise, gaussian-blur,
contrast, brightness, saturate, pixelate, fog (a smooth random low-frequency haze), and
for LfF's Corrupted CIFAR-10 "Type0" list (TYPE0): snow, frost, spatter, elastic, jpeg.
These are our torch versions of the usual corruption types, not bit-exact copies: the
new five follow the structure and per-severity constants of Hendrycks' CIFAR-10-C code
(as used by LfF) with documented substitutes where it relies on ImageMagick, OpenCV or
frost photographs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .core import ImageDataset, make_generator


def _gaussian_noise(x, s, g, span):
    return x + torch.randn(x.shape, generator=g).to(x.device) * span * [0.04, 0.06, 0.08, 0.09, 0.10][s - 1]


def _shot_noise(x, s, g, span, lo):
    rate = [60, 25, 12, 5, 3][s - 1]
    unit = ((x - lo) / span).clamp(0, 1)
    return lo + span * torch.poisson(unit.cpu() * rate, generator=g).to(x.device) / rate


def _gaussian_blur(x, s):
    sigma = [0.4, 0.6, 0.7, 0.8, 1.0][s - 1]
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _contrast(x, s):
    factor = [0.75, 0.5, 0.4, 0.3, 0.15][s - 1]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor + mean


def _brightness(x, s, span):
    return x + span * [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]


def _saturate(x, s):
    factor = [0.3, 0.1, 2.0, 5.0, 20.0][s - 1]
    gray = x.mean(dim=1, keepdim=True)
    return gray + (x - gray) * factor


def _pixelate(x, s):
    factor = [0.95, 0.9, 0.85, 0.75, 0.65][s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def _fog(x, s, g, span, lo):
    strength = [0.2, 0.3, 0.4, 0.5, 0.6][s - 1]
    n, _, h, w = x.shape
    coarse = torch.rand((n, 1, 4, 4), generator=g).to(x.device)
    haze = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    return x * (1 - strength) + strength * (lo + span * haze)


# --------------------------------------------------------------------------- LfF Type0 corruptions
# These work on u = images mapped to [0, 1] (corrupt() maps value_range there and back) and
# draw all randomness on the CPU from the seeded generator, so a seed gives the same noise on
# every device. Per-severity constants are those of Hendrycks' CIFAR-10-C code (the 32x32 ones
# in LfF's copy); lengths given there in pixels of a 32x32 image are scaled by min(H, W) / 32.

def _reflect_index(n: int, r: int, device) -> torch.Tensor:
    """Indices of an axis of length n padded by r per side by reflection; unlike F.pad, r may exceed n."""
    i = torch.arange(-r, n + r, device=device)
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.abs() % period
    return torch.where(i >= n, period - i, i)


def _blur_matrix(n: int, sigma: float, dtype, device) -> torch.Tensor:
    """(n, n) matrix of a 1-D Gaussian blur (3 sigma support) with reflected borders."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    rows = torch.arange(n)[:, None].expand(n, 2 * r + 1)
    cols = _reflect_index(n, r, "cpu")[rows + torch.arange(2 * r + 1)]
    m = torch.zeros(n, n, dtype=torch.float64).index_put_((rows, cols), k.expand(n, -1), accumulate=True)
    return m.to(dtype=dtype, device=device)


def _smooth(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (3 sigma support, reflected borders) of (N,C,H,W) for any image size,
    as two small matrix products (much faster on CPU than a grouped conv over thousands of images)."""
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    return _blur_matrix(h, sigma, x.dtype, x.device) @ x @ _blur_matrix(w, sigma, x.dtype, x.device).T


def _luma(u: torch.Tensor) -> torch.Tensor:
    """(N,1,H,W) gray: ITU-R 601 weights for RGB (as cv2.COLOR_RGB2GRAY), the channel mean otherwise."""
    if u.shape[1] == 3:
        return (u * u.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return u.mean(1, keepdim=True)


def _tint(color, c: int, u: torch.Tensor) -> torch.Tensor:
    """An RGB color as a (1,C,1,1) tensor; images without 3 channels get its luma instead."""
    rgb = u.new_tensor(color)
    if c != 3:
        rgb = (rgb * u.new_tensor([0.299, 0.587, 0.114])).sum().expand(c)
    return rgb.view(1, c, 1, 1)


def _clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the center by `zoom` (bilinear) and crop back to the input size, as Hendrycks' clipped_zoom."""
    if zoom == 1:
        return x
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    big = F.interpolate(x[..., top:top + ch, left:left + cw], size=(max(h, round(ch * zoom)), max(w, round(cw * zoom))),
                        mode="bilinear", align_corners=False)
    t, l = (big.shape[-2] - h) // 2, (big.shape[-1] - w) // 2
    return big[..., t:t + h, l:l + w]


def _motion_blur(layer: torch.Tensor, radius: int, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """One-sided Gaussian-weighted line blur along angle (degrees, one per image), as ImageMagick's
    MotionBlurImage: taps i = 0..2*radius at the rounded offsets i * (cos, sin)(angle), weights
    exp(-i^2 / 2 sigma^2), zero outside the image. Each image has its own kernel, so the correlation
    is done by FFT on a zero-padded canvas large enough that nothing wraps around.
    """
    n, _, h, w = layer.shape
    if n == 0:  # MKL's FFT refuses an empty batch
        return layer.clone()
    reach = 2 * radius
    taps = torch.arange(reach + 1, dtype=torch.float64)
    weight = torch.exp(-(taps ** 2) / (2 * sigma ** 2))
    weight = weight / weight.sum()
    rad = torch.deg2rad(angle.double())
    off_x = torch.round(taps[None] * torch.cos(rad)[:, None]).long()  # (n, T)
    off_y = torch.round(taps[None] * torch.sin(rad)[:, None]).long()
    ph, pw = h + reach, w + reach
    kernel = torch.zeros(n, ph * pw, dtype=torch.float64)
    kernel.scatter_add_(1, (off_y % ph) * pw + off_x % pw, weight.expand(n, -1).contiguous())
    spec = torch.fft.rfft2(F.pad(layer[:, 0].double(), (0, reach, 0, reach)))
    out = torch.fft.irfft2(spec * torch.fft.rfft2(kernel.view(n, ph, pw)).conj(), s=(ph, pw))
    return out[:, None, :h, :w].clamp_(min=0).to(layer.dtype)


# (mean, std, zoom, threshold, blur radius, blur sigma, image weight) of the snow layer
_SNOW = ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))


def _snow(u, s, g):
    """Sparse bright flakes (thresholded, zoomed Gaussian noise) streaked by a motion blur at a random
    angle in [-135, -45] degrees, added twice (the layer and its 180-degree rotation) to the image
    blended with its brightened gray max(u, 1.5 gray + 0.5), as in Hendrycks' snow."""
    mean, std, zoom, threshold, radius, sigma, keep = _SNOW[s - 1]
    n, _, h, w = u.shape
    scale = min(h, w) / 32
    layer = torch.randn((n, 1, h, w), generator=g) * std + mean
    layer = _clipped_zoom(layer, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    angle = torch.rand(n, generator=g) * 90 - 135
    layer = _motion_blur(layer, max(1, round(radius * scale)), max(sigma * scale, 0.5), angle).to(u.device)
    u = keep * u + (1 - keep) * torch.maximum(u, _luma(u) * 1.5 + 0.5)
    return u + layer + layer.flip(-2, -1)


_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # (image weight, frost weight)


def _frost_texture(n, h, w, g):
    """A procedural ice texture in [0, 1] (N,1,H,W): ridged multi-octave value noise, i.e. thin bright
    veins where bicubic-interpolated random grids cross 0.5, at periods of 16, 8, 4 and 2 pixels
    (of a 32x32 image), coarse octaves strongest, on a faint bright base."""
    scale = min(h, w) / 32
    tex = torch.zeros(n, 1, h, w)
    total = 0.0
    for k, period in enumerate((16, 8, 4, 2)):
        cells = (max(1, math.ceil(h / (period * scale))), max(1, math.ceil(w / (period * scale))))
        grid = torch.rand((n, 1, cells[0] + 1, cells[1] + 1), generator=g)
        noise = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
        ridge = (1 - (2 * noise - 1).abs()).clamp(0, 1) ** 4
        amp = 0.65 ** k
        tex += amp * ridge
        total += amp
    return (0.25 + 0.75 * tex / total).clamp(0, 1)


def _frost(u, s, g):
    """Hendrycks' frost mixes c0 * image + c1 * a crop of a frost photograph; without the photos we mix
    in a procedural pale-blue ice texture with the same per-severity weights."""
    keep, weight = _FROST[s - 1]
    n, c, h, w = u.shape
    tex = _frost_texture(n, h, w, g).to(u.device)
    return keep * u + weight * tex * _tint((0.85, 0.93, 1.0), c, u)


# (noise mean, noise std, blur sigma, threshold, water strength | mud blur sigma, mud?)
_SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1.0, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1))


def _spatter(u, s, g):
    """Blobs where blurred Gaussian noise exceeds a threshold. Severities 1-3 (water): a pale
    turquoise layer proportional to the blob values, normalized per image, is added (Hendrycks also
    shades it by a distance transform of its Canny edges; we do not). Severities 4-5 (mud): the blob
    interiors (blurred mask >= 0.8) are replaced by mud brown, as in Hendrycks."""
    mean, std, sigma, threshold, p, mud = _SPATTER[s - 1]
    n, c, h, w = u.shape
    scale = min(h, w) / 32
    liquid = _smooth(torch.randn((n, 1, h, w), generator=g) * std + mean, sigma * scale)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        m = liquid / liquid.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6) * p
        return u + m.to(u.device) * _tint((175 / 255, 238 / 255, 238 / 255), c, u)
    m = _smooth((liquid > threshold).float(), p * scale)
    m = torch.where(m < 0.8, torch.zeros_like(m), m).to(u.device)
    return u * (1 - m) + m * _tint((63 / 255, 42 / 255, 20 / 255), c, u)


# (alpha, sigma, affine jitter) as fractions of the image size (Hendrycks: times IMSIZE = 32)
_ELASTIC = ((0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


def _elastic(u, s, g):
    """Hendrycks' elastic transform: a random affine warp (three anchor points jittered by up to
    `jitter` pixels) plus a displacement field of uniform noise smoothed by a Gaussian of width sigma
    and scaled by alpha; bilinear resampling with reflected borders. Hendrycks' schedule: alpha grows
    and sigma and the affine jitter shrink with severity, so the warp gets more local, not larger.

    This is what torchvision's v2.functional.elastic does (identity grid + displacement, grid_sample),
    written out because that takes one field per call and fills borders with a constant.
    """
    n, c, h, w = u.shape
    size = min(h, w)
    alpha, sigma, jitter = (v * size for v in _ELASTIC[s - 1])
    # affine part: the displacement at every pixel interpolates (barycentrically) the jitter of three anchors
    cy, cx, half = float(h // 2), float(w // 2), float(max(size // 3, 1))
    anchors = torch.tensor([[cx + half, cy + half], [cx - half, cy + half], [cx - half, cy - half]])
    delta = (torch.rand((n, 3, 2), generator=g) * 2 - 1) * jitter
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    pts = torch.stack([xs, ys], -1) - anchors[0]  # (H, W, 2)
    basis = torch.stack([anchors[1] - anchors[0], anchors[2] - anchors[0]], 1)  # columns: the two edges
    lam12 = pts @ torch.linalg.inv(basis).T
    lam = torch.cat([1 - lam12.sum(-1, keepdim=True), lam12], -1)  # (H, W, 3)
    disp = torch.einsum("hwk,nkd->nhwd", lam, delta)  # (n, H, W, 2) pixels, (x, y)
    if alpha > 0:
        field = torch.rand((n, 2, h, w), generator=g) * 2 - 1
        disp = disp + (_smooth(field, sigma) * alpha).permute(0, 2, 3, 1)
    grid = torch.stack([(xs + 0.5) * (2 / w) - 1, (ys + 0.5) * (2 / h) - 1], -1)
    grid = grid + disp * torch.tensor([2 / w, 2 / h])
    return F.grid_sample(u, grid.to(device=u.device, dtype=u.dtype), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


_JPEG_QUALITY = (80, 65, 58, 50, 40)  # Hendrycks' CIFAR-10-C qualities


def _jpeg(u, s):
    """JPEG round trip of the images quantized to uint8 (so clipped to [0, 1]) at Hendrycks' quality, via Pillow as in
    Hendrycks' and LfF's code (Pillow comes with matplotlib; torchvision.io's encode_jpeg gives the
    same bytes but is optional here and deprecated). RGB and gray images are coded as such, other
    channel counts one channel at a time."""
    import io

    from PIL import Image

    n, c, h, w = u.shape
    q = (u.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    planes = q.permute(0, 2, 3, 1).numpy() if c == 3 else q.reshape(n * c, h, w).numpy()
    out = []
    for plane in planes:
        buf = io.BytesIO()
        Image.fromarray(plane).save(buf, format="JPEG", quality=_JPEG_QUALITY[s - 1])
        buf.seek(0)
        with Image.open(buf) as img:
            out.append(torch.from_numpy(np.asarray(img).copy()))
    if not out:
        return u
    out = torch.stack(out)
    out = out.permute(0, 3, 1, 2) if c == 3 else out.reshape(n, c, h, w)
    return out.to(device=u.device, dtype=u.dtype) / 255


CORRUPTIONS = ("gaussian-noise", "shot-noise", "gaussian-blur", "contrast", "brightness", "saturate",
               "pixelate", "fog", "snow", "frost", "spatter", "elastic", "jpeg")

# LfF's Corrupted CIFAR-10 Type0 list in its order: index = bias attribute.
TYPE0 = ("snow", "frost", "fog", "brightness", "contrast", "spatter", "elastic", "jpeg", "pixelate", "saturate")


def _unit(fn, x, lo, span, *args):
    """fn applied to x mapped to [0, 1], mapped back: the Type0 recipes are written for [0, 1] images."""
    return lo + span * fn((x - lo) / span, *args)


def corrupt(images: torch.Tensor, name: str, severity: int = 3, *, value_range=(0.0, 1.0), seed: int = 0,
            clamp: bool = True) -> torch.Tensor:
    """A corrupted float copy of images (N, C, H, W) in value_range."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    if not isinstance(severity, int) or not 1 <= severity <= 5:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    lo, hi = float(value_range[0]), float(value_range[1])
    span = hi - lo
    g = make_generator(seed, 0xC0)
    x = images.float()
    out = {
        "gaussian-noise": lambda: _gaussian_noise(x, severity, g, span),
        "shot-noise": lambda: _shot_noise(x, severity, g, span, lo),
        "gaussian-blur": lambda: _gaussian_blur(x, severity),
        "contrast": lambda: _contrast(x, severity),
        "brightness": lambda: _brightness(x, severity, span),
        "saturate": lambda: _saturate(x, severity),
        "pixelate": lambda: _pixelate(x, severity),
        "fog": lambda: _fog(x, severity, g, span, lo),
        "snow": lambda: _unit(_snow, x, lo, span, severity, g),
        "frost": lambda: _unit(_frost, x, lo, span, severity, g),
        "spatter": lambda: _unit(_spatter, x, lo, span, severity, g),
        "elastic": lambda: _unit(_elastic, x, lo, span, severity, g),
        "jpeg": lambda: _unit(_jpeg, x, lo, span, severity),
    }[name]()
    return out.clamp(lo, hi) if clamp else out


def parse_corruption(spec: str) -> tuple[str, int]:
    """'NAME' or 'NAME:SEVERITY' -> (name, severity); severity defaults to 3."""
    name, _, sev = spec.partition(":")
    try:
        severity = int(sev) if sev else 3
    except ValueError:
        raise ValueError(f"corruption must be NAME or NAME:SEVERITY (1..5), got {spec!r}") from None
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; valid names: {', '.join(CORRUPTIONS)}")
    return name, severity


def corrupted_dataset(dataset: ImageDataset, spec: str, *, seed: int = 0) -> ImageDataset:
    """The dataset with a corruption applied to every image (uint8 sets stay uint8)."""
    name, severity = parse_corruption(spec)
    images = dataset.images
    if images.dtype == torch.uint8:
        out = corrupt(images.float() / 255, name, severity, seed=seed)
        out = (out * 255).round().to(torch.uint8)
    else:  # float data (e.g. standardized): use its 1%..99% range
        flat = images.flatten().float()
        sample = flat[torch.randperm(flat.numel(), generator=make_generator(seed, 1))[:100_000]]
        lo, hi = torch.quantile(sample, 0.01).item(), torch.quantile(sample, 0.99).item()
        out = corrupt(images, name, severity, value_range=(lo, hi), seed=seed, clamp=False)
    return ImageDataset(out, dataset.labels, dataset.attributes, num_classes=dataset.num_classes,
                        num_attributes=dataset.num_attributes, name=f"{dataset.name}-{name}{severity}")
