"""G SmallCNNs of one architecture as one module: grouped convolutions, each member in its own channel slot.

Member g's channels are slot g of every activation: (N, G*C, H, W) holds the G members'
(N, C, H, W) side by side. A 3x3 convolution with ``groups=G`` (the members' weights
concatenated along the output channels) is then G independent convolutions; GroupNorm with
G times the member's groups normalises exactly each member's own groups (a group's channels
are contiguous and never straddle two slots); the head is a per-member linear map (``baddbmm``).
Every member sees its own images, so G classifiers trained on G different batches cost one
forward and one backward pass. Dropout takes explicit masks, so a caller can draw each
member's from that member's own random stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utilgen.models.classifier import SmallCNN

STACKABLE = ("cnn-small", "cnn-medium")  # the build_classifier names that build a SmallCNN


def _average_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """AvgPool2d(2) as a depthwise 2x2 stride-2 convolution with weights 1/4: the same sums, faster on CPU
    (fwd + bwd, 1 thread, (64, 32, 16, 16): 1.2 ms against avg_pool2d's 2.3 ms; (64, 64, 8, 8): 0.7 against 1.2)."""
    channels = x.shape[1]
    weight = torch.full((channels, 1, 2, 2), 0.25, dtype=x.dtype, device=x.device)
    return F.conv2d(x, weight, stride=2, groups=channels)


class StackedSmallCNN(nn.Module):
    """``members`` (SmallCNNs of one architecture) stacked; their weights are copied, the members left as they are.

    Forward: images (G, N, C, H, W), member g's batch at [g], and dropout masks (G, N, C') or None
    (no dropout); logits (G, N, K). ``member_state_dict(g)`` gives member g back under SmallCNN's names.
    """

    def __init__(self, members: Sequence[SmallCNN]):
        super().__init__()
        if not members or not all(isinstance(m, SmallCNN) for m in members):
            raise ValueError("StackedSmallCNN stacks one or more SmallCNNs")
        shapes = [[(name, p.shape) for name, p in m.named_parameters()] for m in members]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("StackedSmallCNN stacks SmallCNNs of one architecture (equal parameter shapes)")
        self.size = len(members)
        self.dropout = members[0].head[1].p
        # The forward as a flat plan, with the member parameter names each step reads.
        self.plan: list[tuple] = []
        for index, stage in enumerate(members[0].features):
            if isinstance(stage, nn.AvgPool2d):
                if (stage.kernel_size, stage.stride, stage.padding, stage.ceil_mode) != (2, 2, 0, False):
                    raise ValueError("StackedSmallCNN expects the CNN family's AvgPool2d(2)")
                self.plan.append(("pool",))
                continue
            conv, norm, _ = stage
            if conv.bias is not None or conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
                raise ValueError("StackedSmallCNN expects the CNN family's 3x3, stride 1, padding 1, bias-free convs")
            self.plan += [
                ("conv", f"features.{index}.0.weight"),
                ("norm", f"features.{index}.1.weight", f"features.{index}.1.bias", norm.num_groups, norm.eps),
                ("relu",),
            ]
        self.names = [name for name, _ in members[0].named_parameters()]
        self.head_names = [name for name in self.names if name.startswith("head.")]  # [weight, bias]
        stacked = []
        for name in self.names:
            tensors = [dict(m.named_parameters())[name].detach() for m in members]
            # features: slot layout (G*C, ...) along the channels; head: a leading member axis (G, ...)
            stacked.append(torch.stack(tensors) if name in self.head_names else torch.cat(tensors))
        self.weights = nn.ParameterList([nn.Parameter(t.clone()) for t in stacked])

    def parameter(self, name: str) -> torch.Tensor:
        return self.weights[self.names.index(name)]

    def forward(self, images: torch.Tensor, dropout_masks: torch.Tensor | None = None) -> torch.Tensor:
        g, n, c, h, w = images.shape
        if g != self.size:
            raise ValueError(f"images hold {g} members' batches, the stack has {self.size} members")
        x = images.transpose(0, 1).reshape(n, g * c, h, w)  # (N, G*C, H, W): member g in channel slot g
        for step in self.plan:
            if step[0] == "conv":
                x = F.conv2d(x, self.parameter(step[1]), padding=1, groups=g)
            elif step[0] == "norm":
                _, weight, bias, groups, eps = step
                x = F.group_norm(x, groups * g, self.parameter(weight), self.parameter(bias), eps)
            elif step[0] == "relu":
                x = F.relu(x, inplace=True)  # GroupNorm's backward reads its input, not this output
            else:
                x = _average_pool_2x2(x)
        features = x.mean(dim=(2, 3)).view(n, g, -1).transpose(0, 1)  # (G, N, C')
        if dropout_masks is not None:
            features = features * dropout_masks
        weight, bias = (self.parameter(name) for name in self.head_names)  # (G, K, C'), (G, K)
        return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))  # (G, N, K)

    def member_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s weights under SmallCNN's parameter names."""
        state = {}
        for name, stacked in zip(self.names, self.weights, strict=True):
            if name in self.head_names:
                state[name] = stacked[index].detach().clone()
            else:
                width = stacked.shape[0] // self.size
                state[name] = stacked[index * width : (index + 1) * width].detach().clone()
        return state
