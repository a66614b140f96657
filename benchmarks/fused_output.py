"""Peak memory and time of log-prob + entropy + backward from the last hidden states: the fused
output layer (rlsd_megatron/ops/fused_output.py) against the output layer followed by today's ops.

    PYTHONPATH=. .venv/bin/python benchmarks/fused_output.py                   # 2048 tokens, 152K vocabulary
    PYTHONPATH=. .venv/bin/python benchmarks/fused_output.py --tokens 8192 --chunk 1024
    python benchmarks/fused_output.py --device cuda --tokens 8192 --hidden 4096 --chunk 1024   # on a GPU

One process, TP = 1, fp32, Qwen's 151,936-token vocabulary, hidden size `--hidden`:
- ``today``: ``logits = h · Wᵀ`` (what Megatron's output layer writes for the whole micro-batch),
  then `ops.token_log_probs(..., return_entropy=True)`, then the backward to h and W;
- ``fused``: `fused_token_log_probs`, `--chunk` tokens at a time, the backward recomputing each
  chunk's logits (one more matmul) but not its softmax statistics.
Memory as the other CPU benchmarks measure it (benchmarks/peak_rss.py): the peak growth of the
resident set over the forward + backward, glibc mmapping every allocation above 128 KiB so freed
buffers leave at once; the inputs and W's gradient (Megatron's main_grad) exist before the
baseline, and both variants compute ∂W in a [V, H] buffer of their own before adding it there, so
``--hidden`` small next to the tokens shows the logits' share (at 8K tokens and hidden 4096 the
logits are twice ∂W). Time: median
over `--rounds` rounds of wall-clock and of process CPU time (on an oversubscribed shared box the CPU
time is the trustworthy one), the variants interleaved round by round so they share the machine's
load; ratios are medians of per-round ratios.
On a GPU (``--device cuda``) memory is the peak of torch's allocator above what was allocated
before the variant ran, and times are synchronised. The goal (issue 22): fused ≤ 0.1x today's memory at ≤ 1.1x its time; on a GPU the matmul is the
cheap part, on this CPU it dominates, so the recompute weighs more here.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peak_rss import peak_rss_growth, use_mmap_above  # noqa: E402  (benchmarks/peak_rss.py, next to this script)

QWEN_VOCAB = 151_936


def run(variant: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> None:
    from rlsd_megatron import ops
    from rlsd_megatron.ops.fused_output import fused_token_log_probs

    if variant == "today":
        log_p, entropy = ops.token_log_probs(hidden @ weight.t(), targets, return_entropy=True)
    else:
        log_p, entropy = fused_token_log_probs(hidden, weight, targets, return_entropy=True, chunk_tokens=chunk)
    (log_p.sum() + 0.01 * entropy.sum()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--chunk", type=int, default=128, help="tokens per chunk of the fused path")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    from rlsd_megatron.ops.vocab_shard import release_cached_gradients

    libc = ctypes.CDLL("libc.so.6")
    use_mmap_above(libc)
    gen = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) / args.hidden**0.5).to(device).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(device)
    cuda = device.type == "cuda"
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"log-prob + entropy + backward, {args.tokens} tokens x {args.vocab} vocabulary (fp32 logits "
          f"{logits_mib:.0f} MiB), hidden {args.hidden}, fused chunk {args.chunk} tokens, {torch.get_num_threads()} "
          f"thread(s)", flush=True)
    peaks: dict[str, list[float]] = {"today": [], "fused": []}
    wall: dict[str, list[float]] = {"today": [], "fused": []}
    cpu: dict[str, list[float]] = {"today": [], "fused": []}
    for _ in range(args.rounds):
        for variant in ("today", "fused"):
            hidden.grad = None
            weight.grad = torch.zeros_like(weight)  # W's gradient buffer exists in training (DDP's main_grad)
            release_cached_gradients()
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with peak_rss_growth(libc) as peak:
                started, started_cpu = time.perf_counter(), time.process_time()
                run(variant, hidden, weight, targets, args.chunk)
                if cuda:
                    torch.cuda.synchronize()
                wall[variant].append(time.perf_counter() - started)
                cpu[variant].append(time.process_time() - started_cpu)
            peaks[variant].append((torch.cuda.max_memory_allocated() - before if cuda else peak["bytes"]) / 2**20)
            print(f"  {variant:5s}  peak +{peaks[variant][-1]:8.1f} MiB  {wall[variant][-1]:7.2f} s wall  "
                  f"{cpu[variant][-1]:7.2f} s CPU", flush=True)

    def ratio(values: dict[str, list[float]]) -> float:
        return statistics.median(f / t for f, t in zip(values["fused"], values["today"]))

    print("\nvariant   peak extra memory (MiB)   wall (s)   CPU (s)")
    for variant in ("today", "fused"):
        print(f"{variant:7s}   {statistics.median(peaks[variant]):23.1f}   {statistics.median(wall[variant]):8.2f}   "
              f"{statistics.median(cpu[variant]):7.2f}")
    print(f"fused / today: memory {ratio(peaks):.3f}x, wall time {ratio(wall):.2f}x, CPU time {ratio(cpu):.2f}x")

if __name__ == "__main__":
    main()
