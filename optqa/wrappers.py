"""Modules that stand in for a frozen ``nn.Linear`` while answering: a bf16 copy of a tied head, an int8 matmul.

Each wrapper takes the Linear's place in its parent (as PEFT's ``base_layer`` wrappers do) and gives it back
with ``restore``. Under that name it holds the very same parameters and buffers as the Linear (so state-dict
keys, the backbone fingerprint, ``is_delta_parameter`` and the head's tie to the input embedding see nothing
new); only the matmul differs. Nothing is written onto the Linear itself: it is returned untouched. A delta
never puts hooks or children on a frozen Linear (adapter and BitFit are wrapper modules around theirs,
``optqa.deltas.DeltaWrapper``), so the wrapper has none of those to carry over.
"""
from __future__ import annotations

import torch
from torch import nn


class FrozenLinearWrapper(nn.Module):
    """Base of the wrappers: ``base_layer``'s parameters and buffers under its name.

    Args:
        base_layer: the frozen ``nn.Linear`` replaced (kept, not registered: its tensors are the wrapper's own).
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        object.__setattr__(self, "base_layer", base_layer)  # not a child: its names would gain "base_layer."
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        for name, param in base_layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        if base_layer.bias is None:
            self.register_parameter("bias", None)
        for name, buffer in base_layer.named_buffers(recurse=False):
            self.register_buffer(name, buffer)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class CastLinear(FrozenLinearWrapper):
    """A Linear computing with a copy of its weight in another dtype (bf16 answering of a head tied to the
    fp32 input embedding: the embedding, the tie and the state dict stay as they are).

    Args:
        base_layer: the Linear.
        weight: ``(out_features, in_features)``, the cast copy (shared by every model on the same weights).
    """

    def __init__(self, base_layer: nn.Linear, weight: torch.Tensor):
        super().__init__(base_layer)
        self.cast_weight = weight  # a plain attribute, not a buffer: never saved

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden @ cast_weight.T + bias``; ``hidden`` ``(..., in_features)`` -> ``(..., out_features)``."""
        return nn.functional.linear(hidden, self.cast_weight, self.bias)


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding ``root``'s submodule ``name`` (dotted), and the child's own name in it."""
    parent, _, child = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), child


def replace(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``root``'s submodule ``name`` (a wrapper in, or its ``base_layer`` back)."""
    parent, child = parent_of(root, name)
    setattr(parent, child, module)


def restore(root: nn.Module, kind: type[FrozenLinearWrapper]) -> int:
    """Give every ``kind`` wrapper's place in ``root`` back to its Linear.

    Returns:
        How many were restored.
    """
    wrapped = [(name, module) for name, module in root.named_modules() if isinstance(module, kind)]
    for name, module in wrapped:
        replace(root, name, module.base_layer)
    return len(wrapped)
