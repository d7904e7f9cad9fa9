"""U-Net for semantic segmentation: 4 down / 4 up levels with skip connections."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcn_experiments.errors import ConfigError
from dcn_experiments.models.conv import ConvFactory, init_conv_weights
from dcn_experiments.models.registry import MODELS


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory, core: bool) -> None:
        super().__init__(
            conv(in_channels, out_channels, core=core),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, core=core),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """2x transposed-conv upsampling, concatenation with the skip, then a DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, conv: ConvFactory, core: bool) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.fuse = DoubleConv(2 * out_channels, out_channels, conv, core)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes: pad to the skip's size
            dh, dw = skip.shape[-2] - x.shape[-2], skip.shape[-1] - x.shape[-1]
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.fuse(torch.cat([x, skip], dim=1))


class UNet(nn.Module):
    """U-Net; bottleneck + decoder are the default (``stages``) placement for deformable convs."""

    def __init__(
        self, num_classes: int, conv: ConvFactory, in_channels: int = 3, width: int = 32, depth: int = 4
    ) -> None:
        super().__init__()
        if width < 1 or depth < 1:
            raise ConfigError(f"model.width={width} and model.depth={depth} must be positive")
        self.depth = depth
        widths = [width * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0], conv, core=False)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(widths[i], widths[i + 1], conv, core=i == depth - 1))
            for i in range(depth)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], conv, core=True) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        smallest = 2**self.depth  # each level halves the size (rounding down); the bottleneck needs >= 1 px
        if min(x.shape[-2:]) < smallest:
            raise ConfigError(
                f"model=unet with model.depth={self.depth} needs images of at least {smallest}x{smallest} px, got "
                f"{x.shape[-2]}x{x.shape[-1]}; set dataset.image_size>={smallest} or lower model.depth"
            )
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


@MODELS.register("unet", task="segmentation")
def unet(num_classes: int, conv: ConvFactory, in_channels: int = 3, width: int = 32, depth: int = 4) -> UNet:
    """U-Net with ``depth`` down/up levels (4 by default) and base ``width`` channels."""
    return UNet(num_classes, conv, in_channels=in_channels, width=width, depth=depth)
