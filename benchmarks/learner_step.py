"""One training step of our Megatron learner vs the Hugging Face model of the same config and
weights, single process, measured in the same run.

    .venv/bin/python benchmarks/learner_step.py                 # ~27M-parameter Llama, CPU
    .venv/bin/python benchmarks/learner_step.py --hidden 2048 --layers 16 --device cuda   # GPU

Each variant runs in a fresh subprocess (so peak RSS is its own): build the model, load the
same weights (HF → our mapping → Megatron), then time `--steps` forward+backward+AdamW steps on
the same token batch after `--warmup` steps. Peak memory is the peak resident set size above
the post-build baseline on CPU (`ru_maxrss`), `torch.cuda.max_memory_allocated` on GPU.
Prints both and the ratios ours / HF of the median and of the fastest step (target on CPU: time ≤ 1.3×).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def model_config(args):
    from rlsd_megatron.config import ModelConfig

    return ModelConfig(family="llama", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                       ffn_hidden_size=args.ffn, max_position_embeddings=args.seq_len,
                       make_vocab_size_divisible_by=128)


def hf_weights(args):
    import transformers

    from rlsd_megatron.models.hf_config import hf_config_from_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_config_from_model(model_config(args)))
    return transformers.LlamaForCausalLM(config)


def batch(args) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(step, args) -> tuple[list[float], float]:
    cuda = args.device == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mb()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 - base) if cuda else rss_mb()
    return times, peak


def run_hf(args) -> dict:
    model = hf_weights(args).to(args.device)
    tokens = batch(args).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
    start_rss = rss_mb()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(tokens).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    times, peak = time_steps(step, args)
    return {"times": times, "peak_mb": peak if args.device == "cuda" else peak - start_rss}


def run_megatron(args) -> dict:
    from rlsd_megatron.config import Config, OptimizerConfig, ParallelConfig
    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.logging.quiet import quiet_known_noise
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.ops import token_log_probs
    from rlsd_megatron.parallel.state import init_distributed, model_parallel

    quiet_known_noise()
    init_distributed()
    model = model_config(args)
    hf_state = hf_weights(args).state_dict()
    full = dict(hf_to_megatron(hf_state.__getitem__, model))
    del hf_state
    cfg = Config(model=model, parallel=ParallelConfig(use_distributed_optimizer=False),
                 optimizer=OptimizerConfig(lr=1e-5, weight_decay=0.01, clip_grad=1.0))
    tokens = batch(args)
    with model_parallel():
        learner = Learner(cfg)
        learner.load_full_state(full)
        del full
        micro_batch = padded_micro_batch(list(tokens))
        count = int(micro_batch.target_mask.sum())
        start_rss = rss_mb()

        def loss_fn(logits, mb):
            logp = token_log_probs(logits, mb.targets, vocab_size=args.vocab)
            return -(logp * mb.target_mask).sum() / count, {}

        times, peak = time_steps(lambda: learner.train_step([micro_batch], loss_fn), args)
    return {"times": times, "peak_mb": peak if args.device == "cuda" else peak - start_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["hf", "megatron"], help="run one variant (internal)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        result = run_hf(args) if args.variant == "hf" else run_megatron(args)
        print("RESULT " + json.dumps(result))
        return

    params = sum(p.numel() for p in hf_weights(args).parameters())
    print(f"model: llama {params / 1e6:.1f}M parameters, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.threads} threads, device {args.device}")
    results = {}
    for variant in ("hf", "megatron"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, *sys.argv[1:]],
                             capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{variant} failed:\n{out.stderr[-4000:]}")
        results[variant] = json.loads(line[len("RESULT "):])
    for variant, result in results.items():
        med = statistics.median(result["times"])
        tokens_per_s = args.batch * args.seq_len / med
        print(f"{variant:9s} step {med * 1000:8.1f} ms (median of {len(result['times'])}; min "
              f"{min(result['times']) * 1000:.1f})  {tokens_per_s:8.0f} tokens/s  peak +{result['peak_mb']:.0f} MiB")
    ratio = statistics.median(results["megatron"]["times"]) / statistics.median(results["hf"]["times"])
    # The variants run one after the other: on a shared machine the fastest step of each is the
    # figure least disturbed by other load.
    best_ratio = min(results["megatron"]["times"]) / min(results["hf"]["times"])
    mem_ratio = results["megatron"]["peak_mb"] / max(results["hf"]["peak_mb"], 1e-9)
    print(f"ours / HF: time {ratio:.2f}x by median, {best_ratio:.2f}x by fastest step (target <= 1.3x on CPU), "
          f"peak memory {mem_ratio:.2f}x")


if __name__ == "__main__":
    main()
