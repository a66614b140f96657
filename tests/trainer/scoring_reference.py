"""Independent references for the frozen scoring models (OPD's teacher, the KL reference): plain
`transformers` models with given weights, scored in one process, and teacher checkpoints written
by the real HF → Megatron converter."""

from __future__ import annotations

from pathlib import Path

import torch

from rlsd_megatron.config import ModelConfig


def hf_model_with(model: ModelConfig, full_state: dict[str, torch.Tensor]):
    """A `transformers` model of `model`'s architecture holding the canonical Megatron tensors
    `full_state` (as `Learner.full_state()` returns them), fp32, eager attention."""
    from rlsd_megatron.models.hf_mapping import megatron_to_hf
    from rlsd_megatron.rollout.embedded import build_hf_model

    hf = build_hf_model(model, attn_implementation="eager")
    state = {}
    for name, tensor in full_state.items():
        state.update(megatron_to_hf(name, tensor, model))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def hf_token_log_probs(hf, sequence: torch.Tensor, temperature: float) -> torch.Tensor:
    """[L] log π(token_t | tokens_<t) at `temperature`, aligned with the tokens (0 at t = 0)."""
    logits = hf(sequence[None]).logits[0].float()
    logp = torch.log_softmax(logits[:-1] / temperature, -1).gather(1, sequence[1:, None]).squeeze(1)
    return torch.cat([logp.new_zeros(1), logp])


def write_converted_checkpoint(tmp: Path, model: ModelConfig, *, seed: int) -> tuple[str, str]:
    """A random HF model of `model` saved under `tmp/hf` and converted by
    `convert_hf_to_megatron` into `tmp/mcore` (collective over the pool's ranks); returns both
    paths. Call on every rank."""
    import torch.distributed as dist

    from rlsd_megatron.checkpoint.convert import convert_hf_to_megatron
    from tests.hf_models import random_hf_model

    hf_dir, out = tmp / "hf", tmp / "mcore"
    if dist.get_rank() == 0:
        random_hf_model(model, seed=seed).save_pretrained(hf_dir)
    dist.barrier()
    convert_hf_to_megatron(hf_dir, out, progress=False, log=lambda line: None)
    dist.barrier()
    return str(hf_dir), str(out)
