"""Weight exchange with torchvision's ``ssd300_vgg16`` (same layers, different names)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from ssd_lightning.models.vgg import SSD300VGG16

# (torchvision key pattern, our key template). torchvision's `extra.0` is
# [pool4, conv5_1, ReLU, conv5_2, ReLU, conv5_3, ReLU, fc] with fc = [pool5, conv6, ReLU,
# conv7, ReLU]; ours flattens both into `conv7` (fc index m -> 7 + m).
_RULES = (
    (r"backbone\.features\.(\d+)\.(.+)", lambda m: f"backbone.conv4_3.{m[1]}.{m[2]}"),
    (r"backbone\.scale_weight", lambda m: "backbone.l2norm.weight"),
    (r"backbone\.extra\.0\.7\.(\d+)\.(.+)", lambda m: f"backbone.conv7.{7 + int(m[1])}.{m[2]}"),
    (r"backbone\.extra\.0\.(\d+)\.(.+)", lambda m: f"backbone.conv7.{m[1]}.{m[2]}"),
    (r"backbone\.extra\.(\d+)\.(.+)", lambda m: f"backbone.extras.{int(m[1]) - 1}.{m[2]}"),
    (r"head\.regression_head\.module_list\.(.+)", lambda m: f"head.loc.{m[1]}"),
    (r"head\.classification_head\.module_list\.(.+)", lambda m: f"head.cls.{m[1]}"),
)


def _our_key(key: str) -> str:
    for pattern, template in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return template(match)
    raise KeyError(f"no counterpart for torchvision key {key!r}")


def copy_from_torchvision_ssd300(ours: SSD300VGG16, tv_state_dict: Mapping[str, Tensor]) -> None:
    """Loads the weights of torchvision's ``ssd300_vgg16`` into ``ours`` (in place).

    ``ours`` must have the same layout: ``width_mult=1``, ``batch_norm=False``, the same
    ``num_classes`` and ``num_boxes``. Afterwards ``ours(x)`` equals torchvision's
    ``head(list(backbone(x).values()))`` for the same normalised batch ``x`` (torchvision's
    resize/normalise transform bypassed). Strict: every tensor on both sides must match.
    """
    mapped = {_our_key(k): v for k, v in tv_state_dict.items()}
    ours.load_state_dict(mapped, strict=True)
