"""Control images from ordinary pictures, with nothing to download: the maps the common ControlNets read.

- `canny`: Canny 1986, "A Computational Approach to Edge Detection": Gaussian smoothing, Sobel gradients,
  non-maximum suppression along the gradient, then a double threshold with hysteresis (weak edges are kept
  where they connect to strong ones). White edges on black, as `control_*_canny` was trained on
  (lllyasviel/ControlNet `gradio_canny2image.py`, which calls OpenCV's Canny; written here with torch, and
  scipy's connected-component labelling for the hysteresis).
- `scribble`: a threshold map: pixels darker than `threshold` in every channel become white strokes on
  black (ControlNet `gradio_scribble2image.py`: a user's dark strokes on white paper).
- `segmentation`: flat colour regions: k-means (Lloyd 1982, k-means++ seeding of Arthur & Vassilvitskii
  2007) on the pixels' RGB, each pixel painted its cluster's mean colour. A segmentation-like map for the
  `seg` ControlNets' layout (flat regions, sharp borders); the colours are the image's, not ADE20K's class
  palette, so it conveys regions, not classes.

Each takes a PIL image (or an (H, W, 3) uint8 array) and returns an RGB PIL image of the same size;
`preprocess(image, name)` picks one by name ("none": the image as given, for maps made elsewhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

PREPROCESSORS = ("canny", "scribble", "seg", "none")


def _rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image or an array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"a control image must be RGB (H, W, 3) or grey (H, W), got shape {arr.shape}")
    return arr.astype(np.uint8)


def _grey(image) -> torch.Tensor:
    """(H, W) float64 luma in [0, 255] (ITU-R BT.601 weights, as PIL's "L" conversion)."""
    rgb = torch.from_numpy(_rgb(image).astype(np.float64))
    return rgb @ torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)


def _conv(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(H, W) ⊛ (kh, kw) (correlation), edges mirrored."""
    kh, kw = kernel.shape
    x = F.pad(img[None, None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(x, kernel[None, None].to(img))[0, 0]


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian of standard deviation `sigma` pixels over ±⌈4σ⌉ taps (scipy's truncate=4)."""
    if sigma <= 0:
        return img
    r = min(math.ceil(4 * sigma), (min(img.shape) - 1))  # reflect padding needs r < size
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    return _conv(_conv(img, k[None]), k[:, None])


def canny_edges(
    grey: torch.Tensor, low: float = 100.0, high: float = 200.0, sigma: float = 1.0
) -> torch.Tensor:
    """(H, W) bool edge map of a (H, W) image in [0, 255]. low/high: hysteresis thresholds on the Sobel
    gradient magnitude √(gx² + gy²) of the smoothed image (in grey levels per pixel ×8, the Sobel kernel's
    gain; the same units as scikit-image's `feature.canny`). Border pixels are never edges."""
    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    g = gaussian_blur(grey.double(), sigma)
    # Sobel (§ "the gradient"): smoothing [1, 2, 1] across, central difference [-1, 0, 1] along
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=torch.float64)
    gx, gy = _conv(g, sx), _conv(g, sx.T)  # d/dx (columns), d/dy (rows)
    mag = torch.hypot(gx, gy)
    # Non-maximum suppression: keep a pixel that is a local maximum of the magnitude along the gradient,
    # quantised to 0°, 45°, 90°, 135° (Canny's four directions). Ties go to the pixel behind the step
    # (≥ ahead, > behind), so an edge between two pixel centres is one pixel thick.
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # [0, 180)
    sector = (((angle + 22.5) // 45) % 4).long()  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    m = F.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape

    def at(dy: int, dx: int) -> torch.Tensor:
        return m[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    ahead = torch.stack([at(0, 1), at(1, 1), at(1, 0), at(1, -1)])  # one step along +gradient (rows down)
    behind = torch.stack([at(0, -1), at(-1, -1), at(-1, 0), at(-1, 1)])
    idx = sector[None]
    tol = 1e-9 * float(mag.max())  # magnitudes equal but for rounding count as equal (a step's two sides)
    peak = (mag >= ahead.gather(0, idx)[0] - tol) & (mag > behind.gather(0, idx)[0] + tol)
    peak[0, :] = peak[-1, :] = peak[:, 0] = peak[:, -1] = False
    # Double threshold with hysteresis: weak candidates survive in 8-connected groups holding a strong one.
    weak = (peak & (mag >= low)).numpy()
    strong = peak & (mag >= high)
    from scipy import ndimage

    labels, n = ndimage.label(weak, structure=np.ones((3, 3), dtype=bool))
    keep = np.zeros(n + 1, dtype=bool)
    keep[np.unique(labels[strong.numpy()])] = True
    keep[0] = False
    return torch.from_numpy(keep[labels])


def canny(image, low: float = 100.0, high: float = 200.0, sigma: float = 1.0) -> Image.Image:
    """White one-pixel edges on black (RGB), from `canny_edges` on the image's luma."""
    edges = canny_edges(_grey(image), low, high, sigma).numpy()
    return Image.fromarray(np.repeat(edges[..., None] * np.uint8(255), 3, axis=2), "RGB")


def scribble(image, threshold: int = 127) -> Image.Image:
    """White where the picture is darker than `threshold` in every channel (its strokes), black elsewhere."""
    if not 0 <= threshold <= 255:
        raise ValueError(f"scribble threshold must be in [0, 255], got {threshold}")
    strokes = _rgb(image).min(axis=2) < threshold
    return Image.fromarray(np.repeat(strokes[..., None] * np.uint8(255), 3, axis=2), "RGB")


def segmentation(image, k: int = 8, iterations: int = 20, seed: int = 0, sigma: float = 1.0) -> Image.Image:
    """Flat regions: the picture smoothed by a Gaussian of `sigma` pixels (so noise does not speckle the
    regions), k-means with k clusters on its RGB values (fit on at most 16384 pixels drawn with `seed`,
    then every pixel assigned), each pixel painted its cluster's mean colour."""
    if not 1 <= k <= 256:
        raise ValueError(f"segmentation clusters must be in [1, 256], got {k}")
    rgb = torch.from_numpy(_rgb(image).astype(np.float64))  # (H, W, 3)
    h, w, _ = rgb.shape
    smooth = torch.stack([gaussian_blur(rgb[..., c], sigma) for c in range(3)], dim=-1).reshape(-1, 3)
    gen = torch.Generator().manual_seed(seed)
    sample = smooth[torch.randperm(h * w, generator=gen)[:16384]]  # (N, 3)
    # k-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest one
    centres = sample[torch.randint(len(sample), (1,), generator=gen)]
    for _ in range(1, min(k, len(sample))):
        d2 = torch.cdist(sample, centres).min(dim=1).values ** 2
        if d2.sum() == 0:  # fewer distinct colours than k
            break
        centres = torch.cat([centres, sample[torch.multinomial(d2, 1, generator=gen)]])
    for _ in range(iterations):  # Lloyd: assign, then move each centre to its members' mean
        assign = torch.cdist(sample, centres).argmin(dim=1)
        new = torch.stack(
            [sample[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(len(centres))]
        )
        if torch.equal(new, centres):
            break
        centres = new
    labels = torch.cdist(smooth, centres).argmin(dim=1)
    out = centres[labels].round().clamp(0, 255).to(torch.uint8).reshape(h, w, 3)
    return Image.fromarray(out.numpy(), "RGB")


def preprocess(image, name: str = "none") -> Image.Image:
    """The control map `name` (canny | scribble | seg | none) of a picture, with its defaults."""
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown control preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    if name == "canny":
        return canny(image)
    if name == "scribble":
        return scribble(image)
    if name == "seg":
        return segmentation(image)
    return image if isinstance(image, Image.Image) else Image.fromarray(_rgb(image), "RGB")
