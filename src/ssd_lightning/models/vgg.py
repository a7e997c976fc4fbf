"""SSD300 and SSD512 with the VGG16 backbone (SSD paper, Sec. 3 and Fig. 2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor, nn

from ssd_lightning.models.layers import (
    ExtraSpec,
    L2Norm,
    conv_block,
    kaiming_init,
    make_extras,
    read_state_dict,
    scaled_channels,
    xavier_init,
)
from ssd_lightning.models.ssd import SSD

# VGG16 configuration "D": channels, "M" max-pool 2x2 s2, "C" the same in ceil mode (pool3,
# so that conv4_3 is 38x38 at 300). Split at conv4_3, the first source map.
_UP_TO_CONV4_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512)
_CONV5 = ("M", 512, 512, 512)

# Extra layers after conv7 (SSD paper, Fig. 2): 19 -> 10 -> 5 -> 3 -> 1 at 300.
SSD300_EXTRAS = (
    ExtraSpec(256, 512),
    ExtraSpec(128, 256),
    ExtraSpec(128, 256, stride=1, padding=0),
    ExtraSpec(128, 256, stride=1, padding=0),
)
# SSD512 as in the original Caffe model (ssd_pascal_512.py): four stride-2 layers then a 4x4
# conv with pad 1: 32 -> 16 -> 8 -> 4 -> 2 -> 1 at 512. (torchvision's unreleased
# `highres` variant keeps SSD300's unpadded 3x3 layers and gets 16, 8, 6, 4, 1 instead.)
SSD512_EXTRAS = (
    ExtraSpec(256, 512),
    ExtraSpec(128, 256),
    ExtraSpec(128, 256),
    ExtraSpec(128, 256),
    ExtraSpec(128, 256, kernel=4, stride=1, padding=1),
)


def _vgg_layers(
    config: Sequence[int | str], in_channels: int, width_mult: float, batch_norm: bool
) -> tuple[list[nn.Module], int]:
    """torchvision's ``vgg.make_layers`` with scaled channels and a ceil-mode pool ("C")."""
    layers: list[nn.Module] = []
    for v in config:
        if isinstance(v, str):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=v == "C"))
        else:
            out = scaled_channels(v, width_mult)
            layers += conv_block(in_channels, out, 3, batch_norm, padding=1)
            in_channels = out
    return layers, in_channels


class VGG16Features(nn.Module):
    """VGG16 turned into the SSD feature extractor, with the extra layers.

    conv1_1..conv5_3 as VGG16 (pool3 in ceil mode), pool5 3x3 s1 p1, fc6 -> conv6 3x3 dilation 6
    (1024), fc7 -> conv7 1x1 (1024), then ``extras``. Sources: L2Norm(conv4_3) (scale 20),
    conv7, and each extra block. VGG convs use torchvision's init (He normal), the new layers
    Xavier (SSD paper, Sec. 3).

    ``conv4_3`` and ``conv7`` keep torchvision's flat layer order, so ``vgg16().features``
    (or ``vgg16_bn`` with ``batch_norm=True``) weights map onto them by index.

    Args:
        extras: Extra layers after conv7.
        width_mult: Multiplier of every channel count (rounded to a multiple of 8).
        batch_norm: Put BatchNorm after every conv (for training from scratch).

    Shape:
        - x: (B, 3, H, W)
        - output: list of (B, out_channels[i], H_i, W_i), 2 + len(extras) maps.
    """

    def __init__(
        self, extras: Sequence[ExtraSpec], width_mult: float = 1.0, batch_norm: bool = False
    ) -> None:
        super().__init__()
        conv4_3, c4 = _vgg_layers(_UP_TO_CONV4_3, 3, width_mult, batch_norm)
        conv5, c5 = _vgg_layers(_CONV5, c4, width_mult, batch_norm)
        c7 = scaled_channels(1024, width_mult)
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5: 3x3 s1, keeps 19x19
            *conv_block(c5, c7, 3, batch_norm, padding=6, dilation=6),  # conv6, atrous
            *conv_block(c7, c7, 1, batch_norm),  # conv7
        )
        self.conv4_3 = nn.Sequential(*conv4_3)
        self.l2norm = L2Norm(c4, scale=20.0)
        self.conv7 = nn.Sequential(*conv5, *fc)
        self._num_conv5 = len(conv5)  # conv7[:_num_conv5] are VGG layers pool4..conv5_3
        self.extras, extra_channels = make_extras(c7, extras, width_mult, batch_norm)
        self.out_channels = [c4, c7, *extra_channels]
        kaiming_init(self.conv4_3)
        kaiming_init(self.conv7)
        xavier_init(fc)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.conv4_3(x)
        maps = [self.l2norm(x)]
        x = self.conv7(x)
        maps.append(x)
        for block in self.extras:
            x = block(x)
            maps.append(x)
        return maps

    def load_vgg16(self, state_dict: Mapping[str, Tensor]) -> None:
        """Loads torchvision VGG16 weights into conv1_1..conv5_3.

        Accepts ``vgg16().features.state_dict()`` (keys ``"0.weight"``...) or a full
        ``vgg16()`` state dict (``"features.0.weight"``..., classifier ignored); ``vgg16_bn``
        weights when built with ``batch_norm=True``. Every VGG conv must be covered.
        """
        split = len(self.conv4_3)
        mapped = {}
        for key, value in state_dict.items():
            if key.startswith("classifier."):
                continue
            index, rest = key.removeprefix("features.").split(".", 1)
            i = int(index)
            mapped[f"conv4_3.{i}.{rest}" if i < split else f"conv7.{i - split}.{rest}"] = value
        vgg_keys = {
            key
            for key in self.state_dict()
            if key.startswith("conv4_3.")
            or (key.startswith("conv7.") and int(key.split(".")[1]) < self._num_conv5)
        }
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        if unexpected or vgg_keys & set(missing):
            raise ValueError(
                f"not VGG16 weights for this layout: missing {sorted(vgg_keys & set(missing))}, "
                f"unexpected {sorted(unexpected)}"
            )


def _vgg_features(
    extras: Sequence[ExtraSpec],
    width_mult: float,
    batch_norm: bool,
    backbone_weights: str | Path | None,
) -> VGG16Features:
    features = VGG16Features(extras, width_mult, batch_norm)
    if backbone_weights is None:
        return features
    if width_mult != 1.0:
        raise ValueError("backbone_weights need width_mult=1.0 (the VGG16 channel counts)")
    if str(backbone_weights) == "torchvision":
        features.load_vgg16(_download_vgg16(batch_norm))
    else:
        features.load_vgg16(read_state_dict(backbone_weights))
    return features


def _download_vgg16(batch_norm: bool) -> dict[str, Tensor]:
    """ImageNet VGG16 weights through torchvision's weights API (downloads; online use only).

    IMAGENET1K_V1 (not the Caffe-converted IMAGENET1K_FEATURES) because it expects the
    ImageNet mean/std normalisation of ``SSD.mean``/``SSD.std``.
    """
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    return weights.get_state_dict(progress=True)


class SSD300VGG16(SSD):
    """SSD300 with VGG16 (SSD paper, Fig. 2): sources 38, 19, 10, 5, 3, 1 at 300x300.

    Args:
        num_classes: Number of classes C including background (label 0).
        num_boxes: Default boxes per location of each of the 6 maps, or a function of the
            number of maps giving them (see :class:`SSD`).
        width_mult: Multiplier of every channel count; < 1 gives a narrow network of the same
            topology (tests, CPU quickstart).
        batch_norm: BatchNorm after every conv of the backbone and extras.
        backbone_weights: None (random init, the default), a local torchvision-format VGG16
            state-dict file, or ``"torchvision"`` to fetch ImageNet weights through
            torchvision's weights API (needs internet; never the default).

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
        batch_norm: bool = False,
        backbone_weights: str | Path | None = None,
    ) -> None:
        backbone = _vgg_features(SSD300_EXTRAS, width_mult, batch_norm, backbone_weights)
        super().__init__(backbone, num_classes, num_boxes)


class SSD512VGG16(SSD):
    """SSD512 with VGG16: sources 64, 32, 16, 8, 4, 2, 1 at 512x512 (A = 24564 by default).

    Arguments as :class:`SSD300VGG16`, with 7 ``num_boxes`` entries.
    """

    image_size = 512

    def __init__(
        self,
        num_classes: int,
        num_boxes: Sequence[int] | Callable[[int], Sequence[int]] = (4, 6, 6, 6, 6, 4, 4),
        width_mult: float = 1.0,
        batch_norm: bool = False,
        backbone_weights: str | Path | None = None,
    ) -> None:
        backbone = _vgg_features(SSD512_EXTRAS, width_mult, batch_norm, backbone_weights)
        super().__init__(backbone, num_classes, num_boxes)
