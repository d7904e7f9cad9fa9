"""Forward FLOPs per image with deformable convolutions counted (fvcore counts them 0, mmdet's get_flops skips them).

Convention: one multiply-accumulate (MAC) is one FLOP, as in the ResNet paper, fvcore and ptflops
(torchvision's ResNet-34 at 224x224 comes out at 3.66 G). The count comes from forward hooks on a
batch-1 forward pass, so it follows the shapes the model really produces. Per module, with
``out`` the number of output elements (``Cout x Ho x Wo``) and ``k = kh x kw``:

- ``nn.Conv1d/2d/3d`` (including a deformable layer's offset predictor):
  ``out x Cin/groups x k`` (+ ``out`` with a bias).
- ``nn.ConvTranspose1d/2d/3d``: ``input elements x Cout/groups x k`` (+ ``out`` with a bias).
- ``nn.Linear``: ``out x in_features`` (+ ``out`` with a bias).
- :class:`~dcn_experiments.models.conv.DeformConv2d`, in three parts:

  - offset branch: its ``offset_conv`` (a Conv2d with bias, ``offset_groups x k x 3`` outputs for v2,
    ``x 2`` for v1), counted once by the Conv2d rule above. The v2 mask's ``2 * sigmoid`` counts 0,
    like every other activation;
  - sampling: ``Ho x Wo x k x Cin x 4`` (bilinear interpolation: 4 corner MACs per sampled value),
    ``x 5`` for v2 (one more multiply by the mask). Computing the bilinear weights from the offsets
    (per position, tap and offset group, not per channel) counts 0;
  - GEMM: ``Ho x Wo x Cout x Cin/groups x k`` (+ ``out`` with a bias), the same as a regular conv of
    that shape.

Not counted (0, as fvcore's default for activations and element-wise ops): BatchNorm, ReLU and
other activations, pooling, residual additions, concatenation, padding, and any computation done by
``torch``/``F`` calls outside the module types above. (fvcore counts BatchNorm as 1 FLOP per
element; for ResNet-34 that is well under 1 % of the total.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from dcn_experiments.models.conv import DeformConv2d, deformable_layers

FLOP_CATEGORIES = (
    "conv",
    "conv_transpose",
    "linear",
    "deform_gemm",
    "deform_sampling",
    "deform_offset_branch",
)
"""Keys of :func:`flops_breakdown`, always all present. ``deform_offset_branch`` is the offset/mask
predictors' convolutions; ``deform_gemm`` + ``deform_sampling`` are the deformable convolutions
themselves; ``conv`` is every other convolution."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d
ConvTranspose = nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d


def conv_macs(module: Conv, output: Tensor) -> int:
    """MACs of one convolution call: ``out x Cin/groups x k`` (+ ``out`` for the bias)."""
    out = output.numel()
    macs = out * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    return macs + (out if module.bias is not None else 0)


def conv_transpose_macs(module: ConvTranspose, input: Tensor, output: Tensor) -> int:
    """MACs of one transposed convolution call: ``input elements x Cout/groups x k`` (+ ``out`` for the bias)."""
    macs = input.numel() * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    return macs + (output.numel() if module.bias is not None else 0)


def linear_macs(module: nn.Linear, output: Tensor) -> int:
    """MACs of one linear call: ``out x in_features`` (+ ``out`` for the bias)."""
    out = output.numel()
    return out * module.in_features + (out if module.bias is not None else 0)


def deform_macs(module: DeformConv2d, output: Tensor) -> tuple[int, int]:
    """``(gemm, sampling)`` MACs of one deformable convolution call, its offset branch excluded.

    ``gemm = Ho x Wo x Cout x Cin/groups x k`` (+ ``out`` for the bias) and
    ``sampling = Ho x Wo x k x Cin x (4, or 5 with the v2 mask)``, per image in the batch.
    """
    batch, _, out_h, out_w = output.shape
    taps = module.kernel_size[0] * module.kernel_size[1]
    positions = batch * out_h * out_w
    gemm = positions * module.out_channels * (module.in_channels // module.groups) * taps
    gemm += output.numel() if module.bias is not None else 0
    sampling = positions * taps * module.in_channels * (5 if module.version == 2 else 4)
    return gemm, sampling


def flops_breakdown(model: nn.Module, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Forward MACs for one image of shape ``(C, H, W)``, by category (:data:`FLOP_CATEGORIES`).

    Runs one batch-1 forward pass on zeros (so the global RNG is not touched) in eval mode under
    ``torch.no_grad``, on the model's device and dtype; parameters, BatchNorm statistics and every
    submodule's training flag are as before afterwards. See the module docstring for the formulas;
    BatchNorm, activations, pooling, additions and concatenations count 0.
    """
    if len(image_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in image_shape):
        raise ValueError(f"image_shape={tuple(image_shape)} must be three positive ints (C, H, W)")
    totals = dict.fromkeys(FLOP_CATEGORIES, 0)
    predictors = {id(layer.offset_conv) for _, layer in deformable_layers(model)}

    def hook_for(module: nn.Module) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None] | None:
        if isinstance(module, DeformConv2d):

            def count_deform(m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                gemm, sampling = deform_macs(m, output)  # type: ignore[arg-type]
                totals["deform_gemm"] += gemm
                totals["deform_sampling"] += sampling

            return count_deform
        if isinstance(module, _CONVS):
            category = "deform_offset_branch" if id(module) in predictors else "conv"

            def count_conv(m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                totals[category] += conv_macs(m, output)  # type: ignore[arg-type]

            return count_conv
        if isinstance(module, _CONV_TRANSPOSES):

            def count_transpose(m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                totals["conv_transpose"] += conv_transpose_macs(m, inputs[0], output)  # type: ignore[arg-type]

            return count_transpose
        if isinstance(module, nn.Linear):

            def count_linear(m: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                totals["linear"] += linear_macs(m, output)  # type: ignore[arg-type]

            return count_linear
        return None

    reference = next(model.parameters(), None)
    if reference is None:
        reference = next(model.buffers(), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    modes = [(module, module.training) for module in model.modules()]
    handles = []
    try:
        for module in model.modules():
            hook = hook_for(module)
            if hook is not None:
                handles.append(module.register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *image_shape), device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return totals


def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Forward MACs (1 MAC = 1 FLOP) for one image of shape ``(C, H, W)``, deformable layers included.

    The sum of :func:`flops_breakdown`: convolutions ``out x Cin/groups x kh x kw``, transposed
    convolutions ``in x Cout/groups x kh x kw``, linear layers ``out x in_features`` (each + ``out``
    with a bias), and per deformable convolution its offset predictor (a convolution) +
    ``Ho x Wo x k x Cin x (4, or 5 for v2)`` bilinear sampling + its ``Ho x Wo x Cout x Cin/groups x k``
    GEMM. BatchNorm, activations, pooling, additions and concatenations count 0.
    """
    return sum(flops_breakdown(model, image_shape).values())
