"""The convolution factory: the only place that decides regular vs deformable.

``CONVS`` entries take the ``conv`` config (``placement``, ``version``, ...) and return a
:class:`ConvFactory`. Models ask the factory for every 3x3 convolution, saying whether the
convolution sits where DCNv2 places deformable layers (``core=True``); the factory answers with an
``nn.Conv2d`` or a :class:`DeformConv2d` of identical shape. Everything around it (BatchNorm,
ReLU, residuals, 1x1 projections, stems) is built by the model and is the same in both arms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from dcn_experiments.errors import ConfigError
from dcn_experiments.ops import CUDA_KERNEL_CHOICES, deform_conv2d, use_cuda_kernel
from dcn_experiments.registry import Registry

CONVS = Registry("conv", contract="builder(**conv_cfg) -> ConvFactory")

PLACEMENTS = ("stages", "all")


class DeformConv2d(nn.Module):
    """Deformable convolution whose offsets (and v2 modulation) come from one zero-initialised conv.

    The predictor has the same kernel, stride, padding and dilation as the main convolution, so its
    output is on the output grid. Zero initialisation gives offsets 0 and (v2) a mask of
    ``2 * sigmoid(0) = 1``: at step 0 the layer computes exactly the regular convolution.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        version: int = 2,
        offset_groups: int = 1,
        cuda_kernel: str = "auto",
    ) -> None:
        super().__init__()
        if version not in (1, 2):
            raise ConfigError(f"conv.version={version} is not supported; use 1 (DCNv1) or 2 (DCNv2, modulated)")
        if in_channels % groups or out_channels % groups or in_channels % offset_groups:
            raise ConfigError(
                f"channels {in_channels}->{out_channels} must be divisible by groups={groups} "
                f"and offset_groups={offset_groups}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.version, self.offset_groups = groups, version, offset_groups
        # The op's CUDA kernel is a process-wide setting; the layer sets it (ValueError if unknown or
        # Triton is missing) so that a model built with it runs with it.
        use_cuda_kernel(cuda_kernel)
        self.cuda_kernel = cuda_kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        # skip_init: the predictor is zeroed below, and drawing its random init would shift the RNG
        # stream, so the two arms of one seed would no longer start from the same kernels.
        self.offset_conv = nn.utils.skip_init(
            nn.Conv2d,
            in_channels,
            offset_groups * taps * (3 if version == 2 else 2),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self._offset_stats: list[Tensor] = []
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the kernel like ``nn.Conv2d`` and the offset/mask predictor to zero."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.offset_conv.weight)
        nn.init.zeros_(self.offset_conv.bias)

    def offsets_and_mask(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predict the sampling offsets and (v2) the modulation mask for input ``x``."""
        predicted = self.offset_conv(x)
        taps = self.kernel_size[0] * self.kernel_size[1] * self.offset_groups
        if self.version == 1:
            return predicted, None
        offset, mask_logits = predicted.split([2 * taps, taps], dim=1)
        return offset, 2.0 * torch.sigmoid(mask_logits)

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offsets_and_mask(x)
        if self.training:
            magnitude = offset.detach().abs()
            self._offset_stats.append(torch.stack([magnitude.mean(), magnitude.amax()]))
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def pop_offset_stats(self) -> tuple[float, float] | None:
        """Mean and max |offset| (pixels) over the training steps since the last call, then reset."""
        if not self._offset_stats:
            return None
        stats = torch.stack(self._offset_stats)
        self._offset_stats.clear()
        return float(stats[:, 0].mean()), float(stats[:, 1].max())

    def offset_stats_state(self) -> Tensor | None:
        """The per-step statistics gathered since the last pop (for a checkpoint taken mid-epoch)."""
        return torch.stack(self._offset_stats).cpu() if self._offset_stats else None

    def load_offset_stats(self, state: Tensor | None) -> None:
        """Continue gathering from :meth:`offset_stats_state`."""
        self._offset_stats = list(state.to(self.weight.device).unbind(0)) if state is not None else []

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"version={self.version}, offset_groups={self.offset_groups}, bias={self.bias is not None}, "
            f"cuda_kernel={self.cuda_kernel}"
        )


@dataclass(frozen=True)
class ConvFactory:
    """Builds the 3x3 convolutions of a model; ``deformable`` decides which become DCN layers."""

    deformable: bool
    placement: str = "stages"
    version: int = 2
    offset_groups: int = 1
    offset_lr_mult: float = 0.1
    cuda_kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"conv.placement={self.placement!r} is not valid; choose one of {', '.join(PLACEMENTS)}")
        if self.version not in (1, 2):
            raise ConfigError(f"conv.version={self.version} is not supported; use 1 or 2")
        if self.offset_lr_mult < 0:
            raise ConfigError(f"conv.offset_lr_mult={self.offset_lr_mult} must be >= 0")
        if self.cuda_kernel not in CUDA_KERNEL_CHOICES:
            raise ConfigError(
                f"conv.cuda_kernel={self.cuda_kernel!r} is not valid; choose one of {', '.join(CUDA_KERNEL_CHOICES)}"
            )
        if self.deformable:
            try:  # checked here, where the config is read, so the error names the key
                use_cuda_kernel(self.cuda_kernel)
            except ValueError as error:
                raise ConfigError(f"conv.cuda_kernel={self.cuda_kernel}: {error}") from error

    def is_deformable_site(self, core: bool) -> bool:
        """Whether a convolution at a site (``core`` = inside the DCNv2 placement) becomes deformable."""
        return self.deformable and (core or self.placement == "all")

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        core: bool,
        kernel_size: int = 3,
        padding: int | None = None,
        bias: bool = False,
    ) -> nn.Module:
        """A ``kernel_size`` convolution, regular or deformable depending on the site."""
        padding = kernel_size // 2 if padding is None else padding
        if self.is_deformable_site(core):
            return DeformConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                bias=bias,
                version=self.version,
                offset_groups=self.offset_groups,
                cuda_kernel=self.cuda_kernel,
            )
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


@CONVS.register("regular")
def regular_convs(**options: object) -> ConvFactory:
    """Every convolution is ``nn.Conv2d``; placement/version keys are accepted and ignored."""
    return ConvFactory(deformable=False, **options)  # type: ignore[arg-type]


@CONVS.register("deformable")
def deformable_convs(**options: object) -> ConvFactory:
    """3x3 convolutions at the configured placement become :class:`DeformConv2d`."""
    return ConvFactory(deformable=True, **options)  # type: ignore[arg-type]


def deformable_layers(model: nn.Module) -> Iterator[tuple[str, DeformConv2d]]:
    """Yield ``(name, module)`` for every deformable convolution in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, DeformConv2d):
            yield name, module


def offset_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of all offset/mask predictors (they get their own learning rate)."""
    return [p for _, layer in deformable_layers(model) for p in layer.offset_conv.parameters()]


def init_conv_weights(model: nn.Module) -> None:
    """He (fan-out) init for every convolution kernel, regular and deformable alike, so both arms
    start from the same distribution; the offset predictors stay zero."""
    predictors = {id(layer.offset_conv) for _, layer in deformable_layers(model)}
    for module in model.modules():
        if isinstance(module, DeformConv2d) or (isinstance(module, nn.Conv2d) and id(module) not in predictors):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
