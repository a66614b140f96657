"""Small tensor conventions shared by the algorithm modules."""

from __future__ import annotations

import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16/integer tensors to float32; keep float32 and float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def bool_mask(mask: torch.Tensor, like: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A response mask as bool (nonzero = real token), checked against the values' shape."""
    if mask.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the per-token values have shape "
                         f"{tuple(like.shape)}; pass one [B, T] mask entry per response token.")
    return mask if mask.dtype == torch.bool else mask != 0
