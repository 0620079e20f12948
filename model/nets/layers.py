"""Small building blocks shared by the networks."""
from __future__ import annotations

import torch.nn as nn

# tf_efficientnet_lite* normalise with mean = std = 0.5.
IMAGE_MEAN = 0.5
IMAGE_STD = 0.5


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
