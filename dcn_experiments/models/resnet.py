"""ResNet with BasicBlocks (ResNet-34: 3-4-6-3) and a CIFAR or ImageNet stem."""

from __future__ import annotations

from torch import Tensor, nn

from dcn_experiments.errors import ConfigError
from dcn_experiments.models.conv import ConvFactory, init_conv_weights
from dcn_experiments.models.layers import OneDNNSafeConv2d
from dcn_experiments.models.registry import MODELS

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm, ReLU after the residual add; 1x1 projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv: ConvFactory, core: bool) -> None:
        super().__init__()
        self.conv1 = conv(in_channels, out_channels, stride=stride, core=core)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv(out_channels, out_channels, core=core)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            # The projection stays a regular 1x1 convolution in both arms (strided: see OneDNNSafeConv2d).
            self.shortcut = nn.Sequential(
                OneDNNSafeConv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet classifier; stages 2-4 are the DCNv2 placement for deformable convolutions."""

    def __init__(
        self,
        blocks_per_stage: tuple[int, ...],
        num_classes: int,
        conv: ConvFactory,
        in_channels: int = 3,
        width: int = 64,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} is not valid; choose one of {', '.join(STEMS)}")
        if width < 1:
            raise ConfigError(f"model.width={width} must be a positive number of channels")
        if stem == "cifar":
            stem_layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False)]
        else:
            stem_layers = [nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)]
        stem_layers += [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            stem_layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*stem_layers)
        stages = []
        channels = width
        for index, count in enumerate(blocks_per_stage):
            out_channels = width * 2**index
            core = index >= 1  # stages 2-4 (1-based), as in DCNv2
            blocks = [BasicBlock(channels, out_channels, 1 if index == 0 else 2, conv, core)]
            blocks += [BasicBlock(out_channels, out_channels, 1, conv, core) for _ in range(count - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        init_conv_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.fc(self.pool(x).flatten(1))


@MODELS.register("resnet34", task="classification")
def resnet34(num_classes: int, conv: ConvFactory, in_channels: int = 3, width: int = 64, stem: str = "cifar") -> ResNet:
    """ResNet-34 (BasicBlocks 3-4-6-3)."""
    return ResNet((3, 4, 6, 3), num_classes, conv, in_channels=in_channels, width=width, stem=stem)
