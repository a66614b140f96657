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


def check_seq_adv(seq_adv: torch.Tensor, token_tensor: torch.Tensor) -> None:
    """Raise unless `seq_adv` is [B] and `token_tensor` [B, T] with the same B."""
    if seq_adv.dim() != 1 or token_tensor.dim() != 2 or seq_adv.shape[0] != token_tensor.shape[0]:
        raise ValueError(f"seq_adv must be [B] and the per-token tensors [B, T]; got seq_adv "
                         f"{tuple(seq_adv.shape)} and {tuple(token_tensor.shape)}.")
