"""Building blocks shared by the SSD networks: channel scaling, init, L2Norm, extra layers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn


def scaled_channels(channels: int, width_mult: float) -> int:
    """``channels * width_mult`` rounded to a multiple of 8, at least 8.

    Every channel count of the paper (64 ... 1024) is a multiple of 8, so ``width_mult=1``
    gives the exact paper network.
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be positive, got {width_mult}")
    return max(8, round(channels * width_mult / 8) * 8)


def xavier_init(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv of ``module`` (SSD paper, Sec. 3)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def kaiming_init(module: nn.Module) -> None:
    """He-normal (fan_out) conv weights, zero biases, BatchNorm 1/0 (torchvision's VGG/ResNet)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def conv_block(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    batch_norm: bool,
    bias: bool = True,
    **conv_kwargs: int,
) -> list[nn.Module]:
    """Conv [+ BatchNorm] + ReLU as a flat list (flat so state-dict indices match torchvision)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=bias, **conv_kwargs)
    norm = [nn.BatchNorm2d(out_channels)] if batch_norm else []
    return [conv, *norm, nn.ReLU(inplace=True)]


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale.

    SSD paper, Sec. 3.1 (after ParseNet): conv4_3 features have a larger norm than the deeper
    maps, so they are normalised and rescaled, the scale initialised to 20.

    Args:
        channels: Number of channels.
        scale: Initial value of every per-channel scale.

    Shape:
        - x: (B, C, H, W)
        - output: (B, C, H, W), the vector at each position has norm ``weight`` per channel.
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        # The norm in float32, the output in the input's dtype: under bf16 autocast a float32
        # weight times a bf16 input would promote the largest activation map to float32.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        inverse = norm.clamp_min(1e-12).reciprocal().to(x.dtype)  # as F.normalize's eps
        return x * inverse * self.weight.to(x.dtype).view(1, -1, 1, 1)


class ExtraSpec(NamedTuple):
    """One extra feature layer: 1x1 conv to ``mid`` channels, then a ``kernel`` conv to ``out``."""

    mid: int
    out: int
    kernel: int = 3
    stride: int = 2
    padding: int = 1


def make_extras(
    in_channels: int,
    specs: Sequence[ExtraSpec],
    width_mult: float,
    batch_norm: bool,
    bias: bool = True,
) -> tuple[nn.ModuleList, list[int]]:
    """Extra feature layers after the backbone, Xavier-initialised (SSD paper, Fig. 2).

    Returns:
        The blocks (one ``nn.Sequential`` per new source map) and their output channels.
    """
    blocks, out_channels = nn.ModuleList(), []
    for spec in specs:
        mid = scaled_channels(spec.mid, width_mult)
        out = scaled_channels(spec.out, width_mult)
        layers = conv_block(in_channels, mid, 1, batch_norm, bias)
        layers += conv_block(
            mid, out, spec.kernel, batch_norm, bias, stride=spec.stride, padding=spec.padding
        )
        blocks.append(nn.Sequential(*layers))
        out_channels.append(out)
        in_channels = out
    xavier_init(blocks)
    return blocks, out_channels


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a local state-dict file (``torch.load`` with ``weights_only=True``, on CPU)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise TypeError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state
