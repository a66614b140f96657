"""Supervised warm start on a prompt dataset's (prompt, answer) pairs, before RL.

For models trained from scratch (the built-in CPU demo): RL needs a policy that is sometimes
right, and the self-teacher needs a model that can use a hint. A fraction of the examples put
the answer in the teacher's privileged context (`dataset.teacher_context`), the rest use the
student prompt. Stops on *measured* greedy validation accuracy: a greedy decode reproduces the
answer iff the argmax at every answer position is the answer token, so teacher forcing
measures it exactly, in one forward pass.

Runs on a learner of its own (own learning rate and Adam state); the caller copies its weights
into the RL learner afterwards.
"""

from __future__ import annotations

import random

import torch
import torch.distributed as dist

from rlsd_megatron.config import Config
from rlsd_megatron.data.prompts import PromptDataset, PromptRow


def answer_ids(dataset: PromptDataset, row: PromptRow) -> list[int]:
    """The answer's tokens followed by end-of-sequence."""
    tokenizer = dataset.tokenizer
    try:
        ids = tokenizer.encode(row.answer, add_special_tokens=False)
    except TypeError:  # task tokenizers without special tokens
        ids = tokenizer.encode(row.answer)
    return [*ids, dataset.eos_id]


def supervised_examples(dataset: PromptDataset, rows: list[PromptRow], hinted: list[bool]
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt + answer sequences (hinted ones in the teacher's context) and answer-token masks."""
    sequences, masks = [], []
    for row, hint in zip(rows, hinted):
        answer = answer_ids(dataset, row)
        if hint:
            context = dataset.teacher_context.build(row.question, row.answer, answer,
                                                    reference_solution=row.reference_solution, images=row.images)
            ids, start = context.input_ids, context.response_start
        else:
            ids, start = row.prompt_ids + answer, len(row.prompt_ids)
        sequences.append(torch.tensor(ids))
        masks.append(torch.cat([torch.zeros(start), torch.ones(len(ids) - start)]))
    return sequences, masks


def greedy_accuracy(learner, cfg: Config, dataset: PromptDataset, rows: list[PromptRow], *, hinted: bool,
                    group) -> float:
    """Exact-match greedy accuracy over `rows` of every data-parallel rank in `group`."""
    from rlsd_megatron.ops import vocab_topk

    sequences, masks = supervised_examples(dataset, rows, [hinted] * len(rows))

    def answer_argmax_wrong(logits, mb):
        _, top = vocab_topk(logits, 1, vocab_size=cfg.model.vocab_size)
        return {"wrong": ((top[..., 0] != mb.targets.to(top.device)) & (mb.fields["mask"].to(top.device) > 0)).float()}

    batches, _ = learner.micro_batches(sequences, {"mask": masks}, [row.images for row in rows])
    outputs = learner.forward(batches, answer_argmax_wrong)
    counts = torch.zeros(2, dtype=torch.float64)
    if outputs is not None:
        for out in outputs:
            counts += torch.tensor([float((out["wrong"].sum(dim=1) == 0).sum()), float(out["wrong"].shape[0])])
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(counts, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(counts, group=group)
    return float(counts[0] / counts[1])


def run_warm_start(cfg: Config, dataset: PromptDataset, val_rows: list[PromptRow], loader, logger, *,
                   impl: str) -> dict[str, torch.Tensor]:
    """Train a fresh learner supervised, in two phases, and return its canonical weights
    (`Learner.full_state`): plain prompts until greedy accuracy reaches
    `warm_start.stop_accuracy`, then a `hint_fraction` mix of hinted prompts until the hinted
    accuracy reaches `hinted_stop_accuracy` while the plain accuracy is still at least
    `stop_accuracy`. Measured on the built-in task: mixing hints in from
    the start lets the model learn to copy the hint and, in some seeds, never learn the task
    itself (still 0% after 1,500 steps); learning the task first avoids that."""
    import copy

    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.ops import token_log_probs

    ws = cfg.warm_start
    sft_cfg = copy.deepcopy(cfg)
    sft_cfg.optimizer.lr, sft_cfg.optimizer.lr_warmup_steps = ws.lr, 0
    sft_cfg.optimizer.weight_decay = ws.weight_decay
    sft_cfg.train.steps = ws.max_steps
    learner = Learner(sft_cfg, impl=impl)
    dp_group = parallel_state.get_data_parallel_group()
    rng = random.Random(cfg.train.seed)
    phase = "task"
    for step in range(1, ws.max_steps + 1):
        rows = loader.next_batch()
        hint_fraction = 0.0 if phase == "task" else ws.hint_fraction
        sequences, masks = supervised_examples(dataset, rows, [rng.random() < hint_fraction for _ in rows])
        tokens = torch.tensor([float(sum(m.sum() for m in masks))])
        dist.all_reduce(tokens, group=dp_group)

        def loss_fn(logits, mb, total=float(tokens)):
            logp = token_log_probs(logits, mb.targets.to(logits.device), vocab_size=cfg.model.vocab_size)
            return -(logp * mb.fields["mask"].to(logp)).sum() / total, {}

        batches, _ = learner.micro_batches(sequences, {"mask": masks}, [row.images for row in rows])
        stats = learner.train_step(batches, loss_fn)
        if step % ws.eval_interval == 0 or step == ws.max_steps:
            loss = torch.tensor([stats.get("loss", 0.0)])
            dist.all_reduce(loss, group=dp_group)  # each data-parallel rank holds its share
            accuracy = greedy_accuracy(learner, cfg, dataset, val_rows, hinted=False, group=dp_group)
            hinted_accuracy = greedy_accuracy(learner, cfg, dataset, val_rows, hinted=True, group=dp_group)
            logger.message(f"[warm start {step}/{ws.max_steps}, {phase}] loss={float(loss):.4g} "
                           f"greedy accuracy={accuracy:.3f} with hint={hinted_accuracy:.3f}")
            if phase == "task" and accuracy >= ws.stop_accuracy:
                phase = "hint"
            # Learning the hint can erode the task itself: stop only when both hold.
            if phase == "hint" and hinted_accuracy >= ws.hinted_stop_accuracy and accuracy >= ws.stop_accuracy:
                break
    else:
        # The task's phase transition came after 380-530 steps in the 6 seeds measured on the
        # built-in task (warm_start.weight_decay=0.1, 2026-11-25); other settings may need more.
        goal = "learn the task" if phase == "task" else "learn to use the hint"
        logger.message(f"warning: the warm start used all {ws.max_steps} steps and did not {goal} "
                       f"(greedy accuracy {accuracy:.3f}, with hint {hinted_accuracy:.3f}); RL from here will "
                       "learn little or nothing. Raise warm_start.max_steps or try another train.seed.")
    return learner.full_state()


def warm_start_learner(cfg: Config, learner, dataset: PromptDataset, val_rows: list[PromptRow], logger, *,
                       dp_rank: int, dp_size: int) -> None:
    """`run_warm_start` on prompt batches of its own (`warm_start.prompts_per_step`, seed
    `train.seed + 1`), its weights loaded into the RL `learner` and, with `warm_start.output`,
    saved there as a release checkpoint."""
    from rlsd_megatron.data.loader import PromptLoader

    loader = PromptLoader(dataset, global_batch_size=cfg.warm_start.prompts_per_step, dp_rank=dp_rank,
                          dp_size=dp_size, seed=cfg.train.seed + 1)
    learner.load_full_state(run_warm_start(cfg, dataset, val_rows, loader, logger, impl=learner.impl))
    if cfg.warm_start.output:
        from rlsd_megatron.checkpoint import save_checkpoint

        path = save_checkpoint(cfg.warm_start.output, learner.model, cfg, iteration=0, release=True)
        logger.message(f"saved the warm-started weights to {path}")
