"""Peak memory of one OPSD update on CPU as the step grows: the teacher's logits one chunk of
micro-batches at a time (ours) vs holding the whole step's (the design before issue 15).

    PYTHONPATH=. .venv/bin/python benchmarks/distill_memory.py                     # 8, 32, 128 sequences
    PYTHONPATH=. .venv/bin/python benchmarks/distill_memory.py --sequences 8 64 --chunk 2

Model: a tiny Llama (hidden 32, 2 layers) with Qwen's 151,936-token vocabulary, fp32, one process
(TP = PP = DP = 1, one CPU thread). Each sequence: a `--prompt`-token prompt and a
`--response`-token response; its teacher context: a `--teacher-prompt`-token prompt (the hinted
one) and the same response. One OPSD update (full-vocabulary JSD, β = 0.5, a frozen teacher that
differs from the student) over all sequences, `--micro-batch-size` sequences per micro-batch:
- ``ours``: `rlsd_megatron.trainer.update.update_policy` with the teacher's inputs; the teacher's
  logits exist for `--chunk` micro-batches at a time (rlsd_megatron/trainer/distillation.py);
- ``whole step``: the teacher scores every sequence first and the update reads its logits, kept on
  the host, as a micro-batch field (tests/trainer/distill_reference.py, also the tests' reference).
Memory, as benchmarks/vocab_parallel_ops.py measures it (benchmarks/peak_rss.py): glibc mmaps every
allocation above 128 KiB, `malloc_trim` runs before the baseline, the resident set's high-water
mark is reset, and the peak growth of the resident set during the update is reported. The
baseline is read after the model, its Adam state, the teacher copy and the batch exist, so the
figure is what the update itself holds. One worker process measures every (size, variant), each
with its own model and batch; the ops' cached gradient buffers are released before each.

Expected: the whole step grows linearly with the sequences (~3 copies of [tokens, V] fp32: the
teacher's logits, their response rows aligned with the student, the micro-batches' field); ours
stays flat at about one chunk's teacher logits plus the student's logits, gradients and the
divergence's workspace.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: rlsd_megatron and the tests' baseline
from peak_rss import peak_rss_growth, use_mmap_above  # noqa: E402  (benchmarks/peak_rss.py, next to this script)

QWEN_VOCAB = 151_936


def make_config(args):
    from rlsd_megatron.config import AlgorithmConfig, Config, ModelConfig, TrainConfig

    return Config(
        model=ModelConfig(family="llama", vocab_size=QWEN_VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4,
                          ffn_hidden_size=64),
        train=TrainConfig(micro_batch_size=args.micro_batch_size, distill_chunk_micro_batches=args.chunk),
        algorithm=AlgorithmConfig(method="opsd", distill_loss="jsd", distill_beta=0.5, teacher_weights="frozen"),
    )


def make_batch(num_sequences: int, args):
    """Sequences, their per-token fields as the trainer builds them, and the teacher's inputs."""
    from rlsd_megatron.data.teacher_context import TeacherSequence

    gen = torch.Generator().manual_seed(0)
    sequences, contexts = [], []
    for _ in range(num_sequences):
        prompt, response, hinted = (torch.randint(0, QWEN_VOCAB, (n,), generator=gen).tolist()
                                    for n in (args.prompt, args.response, args.teacher_prompt))
        sequences.append(torch.tensor(prompt + response))
        contexts.append(TeacherSequence(hinted + response, response_start=len(hinted), response_length=len(response)))
    mask = torch.cat([torch.zeros(args.prompt), torch.ones(args.response)])
    zeros = torch.zeros_like(mask)  # OPSD reads neither old log-probs nor advantages
    fields = {"loss_mask": [mask] * num_sequences, "distill_mask": [mask] * num_sequences,
              "old_logp": [zeros] * num_sequences, "advantages": [zeros] * num_sequences}
    return sequences, fields, contexts


def one_update(variant: str, num_sequences: int, args) -> int:
    """Peak resident-set growth (bytes) of one OPSD update of `num_sequences` sequences."""
    from megatron.core import parallel_state

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.ops.vocab_shard import release_cached_gradients
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.distillation import TeacherInputs
    from rlsd_megatron.trainer.update import update_policy
    from tests.trainer.distill_reference import with_all_teacher_logits

    libc = ctypes.CDLL("libc.so.6")
    use_mmap_above(libc)
    cfg = make_config(args)
    with model_parallel(tp=1, pp=1, seed=cfg.train.seed):
        learner = Learner(cfg)
        learner.init_optimizer_state()  # Adam's moments exist before the measurement, as after any first step
        gen = torch.Generator().manual_seed(1)
        frozen = {name: w + 0.05 * torch.randn(w.shape, generator=gen) for name, w in learner.local_weights().items()}
        sequences, fields, contexts = make_batch(num_sequences, args)
        teacher = TeacherInputs(contexts, [args.prompt] * num_sequences, frozen)
        dp_group = parallel_state.get_data_parallel_group()
        release_cached_gradients()  # every gradient buffer counts, whatever ran in this worker before
        gc.collect()
        with peak_rss_growth(libc) as peak:
            if variant == "ours":
                stats = update_policy(learner, cfg, sequences, fields, teacher, dp_group=dp_group)
            else:
                stats = update_policy(learner, cfg, sequences, with_all_teacher_logits(learner, fields, teacher),
                                      dp_group=dp_group)
        if not stats["distill"] > 0:
            raise RuntimeError(f"{variant}: the update computed no distillation term ({stats})")
    return peak["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, nargs="+", default=[8, 32, 128], help="sequences in the step")
    parser.add_argument("--prompt", type=int, default=8, help="student prompt tokens")
    parser.add_argument("--response", type=int, default=8, help="response tokens")
    parser.add_argument("--teacher-prompt", type=int, default=12, help="teacher (hinted) prompt tokens")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=1, help="train.distill_chunk_micro_batches")
    args = parser.parse_args()
    from rlsd_megatron.parallel.local_pool import LocalProcessPool

    token_mib = QWEN_VOCAB * 4 / 2**20
    print(f"OPSD update, vocabulary {QWEN_VOCAB} (fp32 logits: {token_mib:.2f} MiB per token), tiny Llama, 1 CPU "
          f"process; {args.prompt}+{args.response} tokens per sequence, teacher prompt {args.teacher_prompt}, "
          f"{args.micro_batch_size} sequences per micro-batch, chunk {args.chunk} micro-batch(es)", flush=True)
    rows = []
    with LocalProcessPool(1) as pool:  # one worker, its own model and batch per measurement
        for n in args.sequences:
            peaks = {}
            for variant in ("ours", "whole step"):
                peaks[variant] = pool.run(one_update, variant, n, args, timeout=3600)[0] / 2**20
                print(f"  {n:5d} sequences  {variant:10s} peak +{peaks[variant]:8.1f} MiB", flush=True)
            rows.append((n, peaks["ours"], peaks["whole step"]))
    print("\nsequences   teacher logits of the step   ours (MiB)   whole step (MiB)   ours / whole step")
    for n, ours, whole in rows:
        step_mib = n * (args.teacher_prompt + args.response) * token_mib
        print(f"{n:9d}   {step_mib:26.0f}   {ours:10.1f}   {whole:16.1f}   {ours / whole:17.3f}")


if __name__ == "__main__":
    main()
