"""SSD300 with a ResNet-50 backbone, as NVIDIA's SSD300 v1.1 (DeepLearningExamples)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from ssd_lightning.models.layers import (
    ExtraSpec,
    kaiming_init,
    make_extras,
    read_state_dict,
    scaled_channels,
)
from ssd_lightning.models.ssd import SSD

# NVIDIA SSD300 v1.1 extras: 1024 -> 512, 512 -> 512, 512 -> 256 (3x3 s2 p1), then
# 256 -> 256 twice (3x3 p0): 38 -> 19 -> 10 -> 5 -> 3 -> 1 at 300.
RESNET_EXTRAS = (
    ExtraSpec(256, 512),
    ExtraSpec(256, 512),
    ExtraSpec(128, 256),
    ExtraSpec(128, 256, stride=1, padding=0),
    ExtraSpec(128, 256, stride=1, padding=0),
)
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def _resnet_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """torchvision's ``ResNet._make_layer`` for Bottleneck blocks with given widths."""
    out = planes * Bottleneck.expansion
    downsample = nn.Sequential(
        nn.Conv2d(inplanes, out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out)
    )
    first = Bottleneck(inplanes, planes, stride, downsample)
    return nn.Sequential(first, *(Bottleneck(out, planes) for _ in range(blocks - 1)))


class ResNet50Features(nn.Module):
    """ResNet-50 up to conv4_x (``layer3``) with stride 1 in its first block, plus extras.

    The first source is conv4_x at 38x38x1024 for a 300x300 input; no L2Norm. The trunk keeps
    torchvision's module names, so a ``resnet50()`` state dict (minus layer4/fc) loads into it.
    Extras: 1x1 bottleneck then 3x3 conv, each followed by BatchNorm and ReLU, no conv bias,
    Xavier init.

    Args:
        width_mult: Multiplier of every channel count (rounded to a multiple of 8).

    Shape:
        - x: (B, 3, H, W)
        - output: list of 6 maps (B, out_channels[i], H_i, W_i).
    """

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()

        def c(channels: int) -> int:
            return scaled_channels(channels, width_mult)

        stem = c(64)
        self.trunk = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False),
                bn1=nn.BatchNorm2d(stem),
                relu=nn.ReLU(inplace=True),
                maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
                layer1=_resnet_layer(stem, c(64), 3, stride=1),
                layer2=_resnet_layer(c(64) * 4, c(128), 4, stride=2),
                # NVIDIA SSD300 v1.1: stride 1 in conv4_x's first block (38x38, not 19x19).
                layer3=_resnet_layer(c(128) * 4, c(256), 6, stride=1),
            )
        )
        kaiming_init(self.trunk)
        trunk_out = c(256) * 4
        self.extras, extra_channels = make_extras(
            trunk_out, RESNET_EXTRAS, width_mult, batch_norm=True, bias=False
        )
        self.out_channels = [trunk_out, *extra_channels]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.trunk(x)
        maps = [x]
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps

    def load_resnet50(self, state_dict: Mapping[str, Tensor]) -> None:
        """Loads a torchvision ``resnet50()`` state dict into the trunk (layer4/fc ignored)."""
        trunk = {k: v for k, v in state_dict.items() if k.split(".", 1)[0] in _TRUNK}
        self.trunk.load_state_dict(trunk, strict=True)


class SSD300ResNet50(SSD):
    """SSD300 with ResNet-50 (NVIDIA SSD300 v1.1): sources 38, 19, 10, 5, 3, 1 at 300x300.

    Args:
        num_classes: Number of classes C including background (label 0).
        num_boxes: Default boxes per location of each of the 6 maps.
        width_mult: Multiplier of every channel count.
        batch_norm: Must stay True: ResNet and these extras always use BatchNorm (the argument
            exists so every network takes the same arguments).
        backbone_weights: None (random init, the default), a local torchvision ``resnet50``
            state-dict file, or ``"torchvision"`` to fetch ResNet50_Weights.IMAGENET1K_V1
            through torchvision's weights API (needs internet; never the default).

    Shape:
        - images: (B, 3, H, W)
        - output: loc (B, A, 4), cls_logits (B, A, C); A = 8732 at 300x300 with the defaults.
    """

    image_size = 300

    def __init__(
        self,
        num_classes: int,
        num_boxes: Sequence[int] | Callable[[int], Sequence[int]] = (4, 6, 6, 6, 4, 4),
        width_mult: float = 1.0,
        batch_norm: bool = True,
        backbone_weights: str | Path | None = None,
    ) -> None:
        if not batch_norm:
            raise ValueError("SSD300ResNet50 always uses BatchNorm; batch_norm=False is invalid")
        backbone = ResNet50Features(width_mult)
        if backbone_weights is not None:
            if width_mult != 1.0:
                raise ValueError("backbone_weights need width_mult=1.0 (ResNet-50 channels)")
            backbone.load_resnet50(_resnet50_state_dict(backbone_weights))
        super().__init__(backbone, num_classes, num_boxes)


def _resnet50_state_dict(source: str | Path) -> dict[str, Tensor]:
    if str(source) != "torchvision":
        return read_state_dict(source)
    from torchvision.models import ResNet50_Weights  # downloads: online machines only

    return ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
