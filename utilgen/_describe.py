"""``describe(value)``: what a value is, for the argument errors of the ops and the data classes.

One wording everywhere an argument has the wrong kind or shape: a tensor is named by
dtype and shape (the two things such an error is about), anything else by its type.
Layer 0 (it needs only torch), so both ``utilgen.ops`` and ``utilgen.data`` use it.
"""

from __future__ import annotations

import torch


def describe(value: object) -> str:
    """'a float32 tensor of shape (2, 3)' for a tensor, else the type's name ('list', 'NoneType')."""
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
