"""Offset views: where a deformable layer samples, drawn over the input images.

For a few output positions of one :class:`~dcn_experiments.models.DeformConv2d` layer, the kernel
taps of the regular grid and the same taps displaced by the predicted offsets are mapped back to
input-image pixels and drawn over the image (v2: the modulation mask sets marker size and opacity).

Coordinate convention: image pixel ``p`` has its centre at coordinate ``p`` (pixel-centre
coordinates, as ``align_corners=False``); a cell ``u`` of a feature map with effective stride ``s``
(image size / map size) covers image pixels ``[u*s, (u+1)*s)`` and is centred at ``(u + 0.5)*s - 0.5``.
A tap ``(i, j)`` of output ``(oy, ox)`` samples the layer's input at
``y = oy*stride - pad + i*dilation + dy`` (``x`` likewise), which maps to image pixel ``(y + 0.5)*s - 0.5``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dcn_experiments.models import DeformConv2d, deformable_layers

log = logging.getLogger(__name__)

# Distinct, bright colours for the output positions (RGB, one per position, cycled).
PALETTE = np.array(
    [(255, 64, 64), (64, 200, 255), (255, 214, 0), (80, 255, 120), (255, 96, 255), (255, 150, 40)], dtype=np.float32
)
PANEL_PIXELS = 224  # images are upscaled (nearest, integer factor) to about this size for drawing
MARGIN_FRACTION = 0.12  # border around each image, so samples that land outside it stay visible
BACKGROUND, GAP = 48, 255  # grey of the border, white of the gap between panels
BLACK = np.zeros(3, np.float32)
IMAGE_BRIGHTNESS = 0.6  # the image is darkened so that the coloured markers stand out


class _CapturedError(Exception):
    """Raised by the capture hook to stop the forward pass once the layer's input is known."""


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under ``torch.compile`` / DDP wrappers (hooks fire reliably there)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def select_layer(model: nn.Module, layer_name: str | None = None) -> tuple[str, DeformConv2d]:
    """The deformable layer called ``layer_name`` (default: the last one) and its name."""
    layers = dict(deformable_layers(_unwrap(model)))
    if not layers:
        raise ValueError("the model has no deformable layers (DeformConv2d); offset views need conv=deformable")
    if layer_name is None:
        return next(reversed(layers.items()))
    if layer_name not in layers:
        raise ValueError(
            f"layer_name={layer_name!r} is not a deformable layer of this model; choose one of: {', '.join(layers)}"
        )
    return layer_name, layers[layer_name]


def _capture(model: nn.Module, layer: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """Run ``model`` in eval mode up to ``layer``; return the layer's input and output."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store["input"], store["output"] = inputs[0].detach(), output.detach()
        raise _CapturedError

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    except _CapturedError:
        pass
    finally:
        handle.remove()
        model.train(was_training)
    if "input" not in store:
        raise ValueError("the chosen deformable layer was not called in the model's forward pass")
    return store["input"], store["output"]


def _grid_positions(out_h: int, out_w: int) -> list[tuple[int, int]]:
    """A 2x2 grid of output positions at about 1/3 and 2/3 of the map; on maps under 8x8, where
    neighbouring 3x3 footprints would cover each other, the single centre position."""
    if min(out_h, out_w) < 8:
        return [(out_h // 2, out_w // 2)]
    ys = sorted({min(out_h - 1, int(f * out_h)) for f in (1 / 3, 2 / 3)})
    xs = sorted({min(out_w - 1, int(f * out_w)) for f in (1 / 3, 2 / 3)})
    return [(y, x) for y in ys for x in xs]


def _salient_positions(activation: Tensor, count: int, extent: int) -> list[tuple[int, int]]:
    """The ``count`` output positions with the largest activation norm, ``extent`` cells apart when
    the map allows it (so that their kernel grids do not overlap)."""
    out_h, out_w = activation.shape[-2:]
    energy = activation.float().pow(2).sum(0).flatten()
    spacing = max(1, min(extent, min(out_h, out_w) // 2))
    chosen: list[tuple[int, int]] = []
    for index in torch.argsort(energy, descending=True).tolist():
        y, x = divmod(index, out_w)
        if all(max(abs(y - cy), abs(x - cx)) >= spacing for cy, cx in chosen):
            chosen.append((y, x))
            if len(chosen) == count:
                break
    return chosen


def sampling_points(
    model: nn.Module,
    images: Tensor,
    layer_name: str | None = None,
    positions: str | Sequence[tuple[int, int]] = "grid",
) -> dict[str, Any]:
    """Where one deformable layer samples for ``images`` (N, C, H, W), in image pixels ``[y, x]``.

    ``positions``: ``"grid"`` (2x2 output positions at 1/3 and 2/3 of the map, the same for every
    image and epoch), ``"salient"`` (the 4 positions with the strongest layer output per image), or
    explicit ``(oy, ox)`` output positions. Returns ``layer``, ``stride`` (effective stride of the
    layer's input, image pixels per input cell, ``(sy, sx)``), ``output_stride``, ``kernel_size``,
    ``image_size`` and ``images``: per image a dict with ``positions`` (P, 2) output cells,
    ``centers`` (P, 2) their centres, ``grid`` (P, K, 2) the regular taps, ``points`` (P, G*K, 2) the
    deformed taps (offset groups stacked group-major) and ``mask`` (P, G*K) for v2, else ``None``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (N, C, H, W); got shape {tuple(images.shape)}")
    name, layer = select_layer(model, layer_name)
    inner = _unwrap(model)
    device = next(inner.parameters()).device
    features, output = _capture(inner, layer, images.to(device))
    with torch.no_grad():
        offset, mask = layer.offsets_and_mask(features)
    offset = offset.float().cpu().numpy()
    mask = None if mask is None else mask.float().cpu().numpy()

    height, width = images.shape[-2:]
    in_h, in_w = features.shape[-2:]
    out_h, out_w = offset.shape[-2:]
    stride = np.array([height / in_h, width / in_w])
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    (ph, pw), (dh, dw) = layer.padding, layer.dilation
    taps, groups = kh * kw, layer.offset_groups
    # tap k = i*kw + j, relative to the top-left input cell of the window, in input cells
    tap_offsets = np.array([(i * dh - ph, j * dw - pw) for i in range(kh) for j in range(kw)], dtype=np.float64)

    def to_image(cells: np.ndarray) -> np.ndarray:
        return (cells + 0.5) * stride - 0.5

    per_image = []
    for n in range(images.shape[0]):
        if isinstance(positions, str):
            if positions == "grid":
                chosen = _grid_positions(out_h, out_w)
            elif positions == "salient":
                chosen = _salient_positions(output[n], 4, max(kh, kw))
            else:
                raise ValueError(f"positions={positions!r} is not valid; use 'grid', 'salient' or (oy, ox) pairs")
        else:
            chosen = [(int(y), int(x)) for y, x in positions]
            bad = [p for p in chosen if not (0 <= p[0] < out_h and 0 <= p[1] < out_w)]
            if bad:
                raise ValueError(f"positions {bad} are outside the layer's {out_h}x{out_w} output map")
        cells = np.array(chosen, dtype=np.int64).reshape(-1, 2)
        origin = cells * np.array([sh, sw])  # input cell of tap offset (0, 0)
        grid = origin[:, None, :] + tap_offsets[None]  # (P, K, 2) input cells
        # offset channels: [dy, dx] per tap, taps of group 0 first -> (G*K, 2, Ho, Wo)
        delta = offset[n].reshape(groups * taps, 2, out_h, out_w)[:, :, cells[:, 0], cells[:, 1]]
        points = np.tile(grid, (1, groups, 1)) + delta.transpose(2, 0, 1)  # (P, G*K, 2)
        per_image.append(
            {
                "positions": cells,
                "centers": to_image(cells * np.array([sh, sw]) + (np.array([sh, sw]) - 1) / 2),
                "grid": to_image(grid),
                "points": to_image(points),
                "mask": None if mask is None else mask[n][:, cells[:, 0], cells[:, 1]].T.copy(),
            }
        )
    return {
        "layer": name,
        "stride": (float(stride[0]), float(stride[1])),
        "output_stride": (float(stride[0] * sh), float(stride[1] * sw)),
        "kernel_size": (kh, kw),
        "image_size": (int(height), int(width)),
        "images": per_image,
    }


def _display_images(
    images: Tensor | np.ndarray, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """(N, H, W, 3) floats in [0, 1]: un-normalised with ``mean``/``std``, else min-max per image."""
    array = images.detach().float().cpu().numpy() if isinstance(images, Tensor) else np.asarray(images, np.float32)
    array = array.transpose(0, 2, 3, 1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if mean is not None and std is not None:
        return np.clip(array * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0.0, 1.0)
    low = array.min(axis=(1, 2, 3), keepdims=True)
    high = array.max(axis=(1, 2, 3), keepdims=True)
    return (array - low) / np.maximum(high - low, 1e-8)


def _blend(canvas: np.ndarray, ys: np.ndarray, xs: np.ndarray, color: np.ndarray, alpha: float) -> None:
    """Alpha-blend ``color`` into the canvas pixels ``(ys, xs)`` (clipped, each pixel once)."""
    inside = (ys >= 0) & (ys < canvas.shape[0]) & (xs >= 0) & (xs < canvas.shape[1])
    flat = np.unique(ys[inside] * canvas.shape[1] + xs[inside])
    ys, xs = np.divmod(flat, canvas.shape[1])
    canvas[ys, xs] = (1 - alpha) * canvas[ys, xs] + alpha * color


def _disc(
    canvas: np.ndarray, cy: float, cx: float, radius: float, color: np.ndarray, alpha: float, ring: float = 0.0
) -> None:
    """A filled disc of ``radius`` centred at ``(cy, cx)``, or a ring ``ring`` pixels wide if ``ring > 0``."""
    r, y0, x0 = math.ceil(radius + 1), round(cy), round(cx)
    ys, xs = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    dist = np.hypot(ys - cy, xs - cx)
    keep = (np.abs(dist - radius) <= ring / 2) if ring > 0 else (dist <= radius)
    _blend(canvas, ys[keep], xs[keep], color, alpha)


def _line(canvas: np.ndarray, start: np.ndarray, end: np.ndarray, color: np.ndarray, alpha: float) -> None:
    """A one-pixel line from ``start`` to ``end`` (``[y, x]``)."""
    steps = int(np.abs(end - start).max()) + 1
    t = np.linspace(0.0, 1.0, steps + 1)[:, None]
    yx = np.rint(start + t * (end - start)).astype(np.int64)
    _blend(canvas, yx[:, 0], yx[:, 1], color, alpha)


def draw_offset_views(
    images: Tensor | np.ndarray,
    points: dict[str, Any],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """The images side by side with the regular taps (rings) and deformed taps (discs) drawn over them.

    ``points`` is :func:`sampling_points`' result for ``images``. Each output position has its own
    colour; a line joins each regular tap to where it samples. With a v2 mask, disc size and opacity
    grow with the modulation (2*sigmoid, 1.0 at init). Each image sits in a grey border so samples
    that fall outside it stay visible. Returns an RGB ``uint8`` array (H, W, 3).
    """
    shown = _display_images(images, mean, std)[: len(points["images"])]
    count, height, width = shown.shape[:3]
    scale = max(1, round(PANEL_PIXELS / max(height, width)))
    margin = max(6, round(MARGIN_FRACTION * max(height, width) * scale))
    radius = max(2.0, round(max(height, width) * scale / 64))
    panel_h, panel_w = height * scale + 2 * margin, width * scale + 2 * margin
    gap = max(2, margin // 4)
    out = np.full((panel_h, count * panel_w + (count - 1) * gap, 3), GAP, dtype=np.float32)

    def to_canvas(yx: np.ndarray) -> np.ndarray:
        return (yx + 0.5) * scale - 0.5 + margin

    for n, (image, view) in enumerate(zip(shown, points["images"], strict=True)):
        canvas = np.full((panel_h, panel_w, 3), BACKGROUND, dtype=np.float32)
        canvas[margin : margin + height * scale, margin : margin + width * scale] = np.kron(
            image * (255.0 * IMAGE_BRIGHTNESS), np.ones((scale, scale, 1), np.float32)
        )
        taps = view["grid"].shape[1]
        for p in range(len(view["positions"])):
            color = PALETTE[p % len(PALETTE)]
            grid, deformed = to_canvas(view["grid"][p]), to_canvas(view["points"][p])
            modulation = np.ones(len(deformed)) if view["mask"] is None else np.asarray(view["mask"][p])
            for k, target in enumerate(deformed):
                _line(canvas, grid[k % taps], target, color, 0.7)
            for tap in grid:
                _disc(canvas, *tap, radius, BLACK, 1.0, ring=3.0)
                _disc(canvas, *tap, radius, color, 1.0, ring=1.5)
            for target, m in zip(deformed, modulation, strict=True):
                size = radius * (0.6 + 0.4 * float(np.clip(m, 0.0, 2.0)))
                opacity = float(np.clip(m, 0.25, 1.0))
                _disc(canvas, *target, size + 1.0, BLACK, opacity)
                _disc(canvas, *target, size, color, opacity)
        left = n * (panel_w + gap)
        out[:, left : left + panel_w] = canvas
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def offset_view_image(
    model: nn.Module,
    images: Tensor,
    layer_name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    positions: str | Sequence[tuple[int, int]] = "grid",
) -> np.ndarray:
    """The offset view of one layer as an RGB ``uint8`` (H, W, 3) array, for TensorBoard's ``add_image``."""
    return draw_offset_views(images, sampling_points(model, images, layer_name, positions), mean, std)


def offset_view_file_name(layer_name: str) -> str:
    """``offsets_<layer>.png`` (characters other than letters, digits, ``.``, ``-``, ``_`` become ``_``)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer_name)
    return f"offsets_{safe}.png"


def write_offset_views(
    model: nn.Module,
    images: Tensor,
    out_dir: Path,
    layer_name: str | Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    positions: str | Sequence[tuple[int, int]] = "grid",
) -> list[Path]:
    """Write ``offsets_<layer>.png`` into ``out_dir`` for one layer (default: the last), or for each
    of several names; the picture is titled with the layer and its stride and has a legend. Returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = [layer_name] if layer_name is None or isinstance(layer_name, str) else list(layer_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        points = sampling_points(model, images, name, positions)
        picture = draw_offset_views(images, points, mean, std)
        dpi = 100
        fig = Figure(figsize=(max(picture.shape[1], 480) / dpi, picture.shape[0] / dpi + 0.9), dpi=dpi)
        FigureCanvasAgg(fig)  # Agg through the object API: no pyplot, no global backend switch
        ax = fig.add_axes(
            (0.0, 0.45 / (picture.shape[0] / dpi + 0.9), 1.0, picture.shape[0] / dpi / fig.get_figheight())
        )
        ax.imshow(picture, interpolation="nearest")
        ax.set_axis_off()
        sy, sx = points["stride"]
        stride = f"{sy:g}" if sy == sx else f"{sy:g}x{sx:g}"
        kh, kw = points["kernel_size"]
        fig.suptitle(
            f"{points['layer']}: input stride {stride} px, {kh}x{kw} kernel",
            fontsize=9,
            y=0.99,
        )
        modulated = any(view["mask"] is not None for view in points["images"])
        handles = [
            Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor="k", label="regular tap"),
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                color="k",
                label="deformed tap" + (" (size, opacity = mask)" if modulated else ""),
            ),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
        path = out_dir / offset_view_file_name(points["layer"])
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def offset_view_logger(
    model: nn.Module, images: Tensor, log_image: Callable[[str, np.ndarray, int], None]
) -> Callable[[int], None] | None:
    """An epoch-end hook drawing the last deformable layer's sampling points for ``images`` via
    ``log_image(tag, rgb, epoch)`` under the tag ``offsets/<layer>``; None without deformable layers."""
    if not any(True for _ in deformable_layers(model)):
        return None
    tag = f"offsets/{select_layer(model)[0]}"

    def log_view(epoch: int) -> None:
        log_image(tag, offset_view_image(model, images), epoch)

    return log_view
