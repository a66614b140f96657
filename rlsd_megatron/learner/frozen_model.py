"""A frozen model that scores the policy's tokens: OPD's teacher (`algorithm.teacher_model`) or
the KL reference (`algorithm.kl_reference`), loaded once from a Megatron checkpoint.

The checkpoint is one written by tools/convert_hf_to_megatron.py or by the trainer
(`warm_start.output`, `checkpoint.dir`); its architecture comes from its own
`rlsd_checkpoint.json`, so it may be larger than the policy and shaped differently, but it must
share the policy's vocabulary (the token ids it scores are the policy's). It is built under the
policy's layout — the same TP / PP / VPP / CP process groups, so each GPU holds 1/(TP·PP) of it
and its forward runs through the same Megatron schedules as the learner's (`ModelRunner`) — in
the policy's dtype and on its device, without DDP, optimizer or gradients. Its heads, query
groups and layers must therefore divide by the policy's TP and PP, which `frozen_model_problems`
checks before anything is built.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rlsd_megatron.checkpoint.directory import INFO_FILE, CheckpointError, read_checkpoint_info
from rlsd_megatron.config import CheckpointConfig, Config, ModelConfig
from rlsd_megatron.learner.runner import ModelRunner, place_model_chunks


def frozen_model_inputs(cfg: Config) -> list[tuple[str, str]]:
    """(setting, checkpoint path) of each frozen model the run loads besides the policy: OPD's
    teacher model, the KL reference when it is a checkpoint."""
    a = cfg.algorithm
    models = []
    if a.teacher_weights == "separate" and a.teacher_model:
        models.append(("algorithm.teacher_model", a.teacher_model))
    if a.kl_coef and a.kl_reference:
        models.append(("algorithm.kl_reference", a.kl_reference))
    return models


def frozen_model_config(path: str | Path, student: ModelConfig, setting: str) -> ModelConfig:
    """The architecture recorded in the checkpoint at `path` (a root or one iteration directory),
    checked to share `student`'s vocabulary. `setting` names the config field in errors (e.g.
    `algorithm.teacher_model`). Raises `CheckpointError` for a missing or unreadable checkpoint,
    one without rlsd_checkpoint.json, or another vocabulary size. Reads metadata only."""
    where = f"{setting}={str(path)!r}"
    if not Path(path).exists():
        raise CheckpointError(f"{where} does not exist; point it at a checkpoint written by "
                              "tools/convert_hf_to_megatron.py or by the trainer (e.g. warm_start.output)")
    try:
        model = read_checkpoint_info(path).model_config()
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (OSError, ValueError, TypeError) as exc:  # ValueError / TypeError: not JSON, or not our fields
        raise CheckpointError(f"{where}: its {INFO_FILE} cannot be read ({type(exc).__name__}: {exc}); point it at a "
                              "complete checkpoint written by the converter or the trainer") from None
    if model.vocab_size != student.vocab_size:
        raise CheckpointError(
            f"{where} has vocab_size {model.vocab_size} and the policy model.vocab_size {student.vocab_size}: it "
            "scores the policy's token ids, so it must share the policy's tokenizer; use a checkpoint of a model "
            "with the same vocabulary")
    return model


def frozen_model_problems(cfg: Config, path: str, setting: str) -> list[str]:
    """What stops the checkpoint at `path` from being loaded as a frozen model of this run: it is
    missing or unreadable, has another vocabulary, or its shape does not divide by the policy's
    layout (`config_checks.layout_problems`). Reads metadata only."""
    from rlsd_megatron.config_checks import layout_problems

    try:
        model = frozen_model_config(path, cfg.model, setting)
    except CheckpointError as exc:
        return [str(exc)]
    p = cfg.parallel
    world = p.tp * p.pp * p.cp  # one model replica: the batch checks come out as the policy's own
    own = set(layout_problems(cfg, world))
    return [f"{setting}={path!r} is loaded under the policy's layout, and its architecture does not fit it: {problem}"
            for problem in layout_problems(dataclasses.replace(cfg, model=model), world) if problem not in own]


class FrozenModel(ModelRunner):
    """A model loaded from a checkpoint for forward passes only (see the module docstring)."""

    def __init__(self, cfg: Config, path: str, *, setting: str, impl: str = "local"):
        """Build and load the checkpoint at `path` under `cfg`'s layout and precision (collective
        over the world); `setting` names the config field in errors."""
        from rlsd_megatron.checkpoint import load_checkpoint
        from rlsd_megatron.models.provider import build_model_chunks

        model = frozen_model_config(path, cfg.model, setting)
        # init_from set: the weights are not drawn, the checkpoint fills them.
        own = dataclasses.replace(cfg, model=model, checkpoint=CheckpointConfig(init_from=str(path)))
        chunks = place_model_chunks(build_model_chunks(own, impl=impl), own)
        load_checkpoint(path, chunks, model=model)
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        super().__init__(own, chunks, impl=impl)
