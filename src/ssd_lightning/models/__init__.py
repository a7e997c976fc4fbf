"""SSD networks: images (B, 3, H, W) -> box offsets (B, A, 4) and class logits (B, A, C)."""

from ssd_lightning.models.heads import SSDHead
from ssd_lightning.models.layers import L2Norm
from ssd_lightning.models.resnet import ResNet50Features, SSD300ResNet50
from ssd_lightning.models.ssd import SSD
from ssd_lightning.models.torchvision_compat import copy_from_torchvision_ssd300
from ssd_lightning.models.vgg import SSD300VGG16, SSD512VGG16, VGG16Features

__all__ = [
    "SSD",
    "SSD300VGG16",
    "SSD512VGG16",
    "L2Norm",
    "ResNet50Features",
    "SSD300ResNet50",
    "SSDHead",
    "VGG16Features",
    "copy_from_torchvision_ssd300",
]
