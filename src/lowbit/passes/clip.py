"""ChannelClip: a ReLU6 whose upper bound differs per channel (what ReLU6 becomes after equalization)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelClip"]


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper[c])`` with one upper bound per channel on axis ``dim`` (1 for conv
    activations, -1 for Linear ones): a ReLU6 after its input channels were rescaled.

    >>> ChannelClip(torch.tensor([1.0, 6.0]), dim=-1)(torch.tensor([[-1.0, 3.0], [2.0, 9.0]])).tolist()
    [[0.0, 3.0], [1.0, 6.0]]
    """

    def __init__(self, upper: torch.Tensor, dim: int = 1, ndim: int | None = None) -> None:
        super().__init__()
        self.register_buffer("upper", upper.detach().clone().float())
        self.dim = dim
        self.ndim = ndim  # rank of the input when known: the broadcast shape is then static (torch.fx traces it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dim == -1:
            up = self.upper
        elif self.ndim is not None:
            up = self.upper.reshape((-1,) + (1,) * (self.ndim - 1 - self.dim % self.ndim))
        else:
            shape = [1] * x.dim()
            shape[self.dim] = -1
            up = self.upper.reshape(shape)
        return torch.minimum(torch.relu(x), up.to(x.device, x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}, dim={self.dim}"
