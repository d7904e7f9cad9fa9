"""Models and the convolution factory. Importing this package registers every model and conv."""

from dcn_experiments.models import resnet, unet  # noqa: F401 - registers the models
from dcn_experiments.models.conv import CONVS, ConvFactory, DeformConv2d, deformable_layers, offset_parameters
from dcn_experiments.models.flops import flops_breakdown, flops_per_image
from dcn_experiments.models.registry import MODELS

__all__ = [
    "CONVS",
    "MODELS",
    "ConvFactory",
    "DeformConv2d",
    "deformable_layers",
    "flops_breakdown",
    "flops_per_image",
    "offset_parameters",
]
