"""CBAM: Convolutional Block Attention Module (Woo et al., "CBAM: Convolutional Block Attention
Module", ECCV 2018), used by HEGH (three stacked blocks after the backbone's second stage).

For a feature map ``F`` (``(N, C, H, W)``):

* channel attention (their eq. 2): ``M_c = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))``, a shared
  two-layer MLP ``C -> C/r -> C`` (ReLU in between), ``F' = M_c * F``;
* spatial attention (their eq. 3): ``M_s = sigmoid(conv7x7([mean_c(F'); max_c(F')]))``,
  ``F'' = M_s * F'``.

Shapes are preserved; both attention maps lie in ``(0, 1)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "CBAM", "stacked_cbam"]


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=True), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, 1, 1)`` attention in (0, 1)."""
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1, H, W)`` attention in (0, 1)."""
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], 1)
        return torch.sigmoid(self.conv(desc))


class CBAM(nn.Module):
    """Channel then spatial attention (sequential, as in Woo et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_c, M_s)`` for input ``x`` (``M_s`` computed on the channel-refined map)."""
        mc = self.channel(x)
        return mc, self.spatial(x * mc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        return x * self.spatial(x)


def stacked_cbam(channels: int, blocks: int = 3, reduction: int = 16, kernel_size: int = 7) -> nn.Sequential:
    if blocks < 1:
        raise ValueError(f"need at least one CBAM block, got {blocks}")
    return nn.Sequential(*[CBAM(channels, reduction, kernel_size) for _ in range(blocks)])
