"""The teacher's logits for distillation, one chunk of the student's micro-batches at a time.

OPSD, SDPO and GRPO+OPSD need the teacher's distribution over the vocabulary at every response
token: [tokens, V/TP], for a whole step at the recipe's size (256 prompts × 8 rollouts, up to
4,096 response tokens, 151,936 / TP ids per token) hundreds of GB per rank. So the teacher never
scores the whole step. The student's micro-batches of an optimizer step are taken `chunk_micro_batches` at a time;
for each chunk the teacher forward runs on exactly its sequences' teacher contexts, with the
teacher policy's weights, and copies the logits that predict response tokens straight into one
buffer per student micro-batch, at the positions where the student predicts the same tokens (the
teacher's prompt differs, its response tokens are the student's). The buffers live on the device
of the last pipeline stage, the only stage whose loss reads them; the student's forward/backward of
the chunk follows and the buffers are dropped before the next chunk's teacher forward. Gradients
accumulate over the chunks into one reduction and one optimizer step
(`Learner.train_step_in_chunks`), so the result is the step's full-batch gradient.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Sequence

import torch
import torch.distributed as dist

from rlsd_megatron.config import Config
from rlsd_megatron.data.teacher_context import TeacherSequence
from rlsd_megatron.learner.batch import MicroBatch


@dataclasses.dataclass(frozen=True)
class TeacherInputs:
    """What the teacher scores for the sequences of one update, in the student's order."""

    contexts: list[TeacherSequence]  # teacher input ids; the student's response at response_start
    prompt_lengths: list[int]  # the student's prompt length of each sequence
    weights: dict[str, torch.Tensor] | None  # the teacher's weights (Learner.use_weights); None: the student's

    def select(self, indices: Sequence[int]) -> "TeacherInputs":
        """The inputs of the sequences `indices` (an optimizer step's share of the batch)."""
        return TeacherInputs([self.contexts[i] for i in indices], [self.prompt_lengths[i] for i in indices],
                             self.weights)


def chunk_micro_batches(cfg: Config) -> int:
    """Student micro-batches per chunk: `train.distill_chunk_micro_batches`, by default `parallel.pp`."""
    return cfg.train.distill_chunk_micro_batches or cfg.parallel.pp


def teacher_weights_for_update(policy_weights: dict[str, torch.Tensor] | None, learner, updates: int
                               ) -> dict[str, torch.Tensor] | None:
    """The weights the teacher scores one rollout batch with: the teacher policy's copy (frozen,
    EMA), or for the live teacher (`policy_weights` None) the student's own. With `updates` > 1
    optimizer steps per batch the live teacher is a snapshot taken before the first, so that every
    step distils toward the same teacher, as the old log-probs are the same for every step (later
    chunks would otherwise be scored by already-updated weights)."""
    if policy_weights is not None or updates == 1:
        return policy_weights
    return {name: weight.clone() for name, weight in learner.local_weights().items()}


def train_step_with_teacher(learner, micro_batches: list[MicroBatch], plan: list[list[int]], teacher: TeacherInputs,
                            loss_fn, *, chunk_micro_batches: int) -> dict[str, float]:
    """One optimizer step over `micro_batches` (sequence indices of each in `plan`, into
    `teacher`'s lists) whose loss reads a `teacher_logits` field: each chunk of
    `chunk_micro_batches` gets it ([B, S, V/TP], last pipeline stage only; see `teacher_logits`)
    right before its forward/backward. Returns `Learner.train_step`'s statistics."""
    if chunk_micro_batches < 1:
        raise ValueError(f"chunk_micro_batches={chunk_micro_batches}: give at least 1 micro-batch per chunk")

    def chunk(members: range):
        def build() -> list[MicroBatch]:
            batches = [micro_batches[j] for j in members]
            logits = teacher_logits(learner, batches, [plan[j] for j in members], teacher)
            if logits is None:  # not the last pipeline stage: its forward never reads them
                return batches
            return [dataclasses.replace(mb, fields={**mb.fields, "teacher_logits": lg})
                    for mb, lg in zip(batches, logits)]
        return build

    total = len(micro_batches)
    chunks = [chunk(range(start, min(start + chunk_micro_batches, total)))
              for start in range(0, total, chunk_micro_batches)]
    return learner.train_step_in_chunks(chunks, loss_fn)


def teacher_logits(learner, micro_batches: list[MicroBatch], plan: list[list[int]], teacher: TeacherInputs
                   ) -> list[torch.Tensor] | None:
    """The teacher's logits for the student's `micro_batches` (unsplit, as `Learner.micro_batch`
    builds them; `plan` gives each one's sequence indices into `teacher`): per micro-batch a
    [B, S, V/TP] tensor whose position p holds the teacher's logits for the token the student
    predicts at p when that is a response token, 0 elsewhere. On the device of the last pipeline
    stage; None on the other stages."""
    from megatron.core import parallel_state

    # Each student position that predicts a response token gets one row of a flat buffer shared by
    # the micro-batches; the teacher's sequences carry, per token, 1 + the row of the student
    # position predicting the same response token (0: not a response token). Micro-batches shift
    # fields like targets, so the teacher's logits at position p, which predict its token p + 1,
    # meet the row of exactly that token.
    rows, sequences, destinations, offset = [], [], [], 0
    for mb, indices in zip(micro_batches, plan):
        flat = torch.arange(offset, offset + mb.tokens.numel()).view(mb.tokens.shape)
        rows.append((offset, mb.tokens.shape))
        offset += mb.tokens.numel()
        for i, predicting in zip(indices, mb.to_sequences(flat)):
            context, start = teacher.contexts[i], teacher.prompt_lengths[i]
            if context.response_length != len(predicting) - start:
                raise ValueError(f"sequence {i}: the teacher context holds {context.response_length} response tokens, "
                                 f"the student's sequence {len(predicting) - start} after its {start}-token prompt; "
                                 "both must hold the same response")
            destination = torch.zeros(len(context.input_ids), dtype=torch.long)
            response = slice(context.response_start, context.response_start + context.response_length)
            destination[response] = 1 + predicting[start:]
            sequences.append(torch.tensor(context.input_ids))
            destinations.append(destination)
    buffer: torch.Tensor | None = None

    def copy_response_logits(logits: torch.Tensor, mb: MicroBatch) -> dict[str, torch.Tensor]:
        nonlocal buffer
        if buffer is None:
            buffer = logits.new_zeros(offset, logits.shape[-1])
        destination = mb.fields["destination"].to(logits.device)
        response = destination > 0
        buffer[destination[response] - 1] = logits.detach()[response]
        return {}

    images = [teacher.contexts[i].images for indices in plan for i in indices]
    batches, _ = learner.micro_batches(sequences, {"destination": destinations}, images)
    scope = learner.use_weights(teacher.weights) if teacher.weights is not None else contextlib.nullcontext()
    with scope:
        learner.forward(batches, copy_response_logits)
    if not learner.is_last_stage:
        return None
    if learner.cp_size > 1:
        # Each context-parallel rank wrote the rows of its own share of the teacher's positions;
        # the others' rows are 0 on it, so a sum assembles the whole buffer exactly.
        dist.all_reduce(buffer, group=parallel_state.get_context_parallel_group())
    return [buffer[start: start + shape.numel()].view(*shape, -1) for start, shape in rows]
