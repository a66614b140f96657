"""Peak memory and time of the vocab-parallel ops against naive gather-then-torch and Megatron's CE.

    .venv/bin/python benchmarks/vocab_parallel_ops.py                    # TP=2 over gloo on CPU, fp32
    .venv/bin/python benchmarks/vocab_parallel_ops.py --dtype bfloat16
    .venv/bin/python benchmarks/vocab_parallel_ops.py --device cuda      # TP=1 on a GPU

Every op runs forward + backward (top-k: forward only) on each rank of a `LocalProcessPool` (one
core per rank) with logits of that rank's shard of a Qwen-size vocabulary, temperature 1:
- ``ours``: `rlsd_megatron.ops` (chunked, never gathers the vocabulary);
- ``naive``: all-gather the shards into [T, V], upcast, and use plain torch ops;
- ``megatron_ce``: megatron-core's ``vocab_parallel_cross_entropy`` (−log p only, no entropy). It
  works in place on its input, so it gets a copy made before the measurement; the gradient it
  returns is that copy's storage, which is why its extra memory is ~0.

Three phases, all ops each:
- ``memory``: peak growth of the resident set. glibc serves every allocation above 128 KiB with
  mmap (so freed buffers leave the resident set at once), ``malloc_trim`` runs before the baseline
  is read from /proc/self/status, the kernel's high-water mark is reset (``echo 5 >
  /proc/self/clear_refs``), and ``VmHWM − baseline`` after the run is the variant's peak extra
  memory on that rank, gradients included (torch's CPU allocator does not cache and the ops' own
  gradient cache is emptied first, so this is what the variant held). Reported: max over ranks.
- ``cold``: time with that allocator, i.e. every fresh buffer pays its page faults, as plain
  torch on CPU does (~0.6 ms per MiB on this box). Megatron returns its input's storage as the
  gradient; ours, on CPU, reuses the storage of its earlier gradients once autograd dropped them
  (`ops.vocab_shard.new_grad`), as every training step after the first does.
- ``warm``: time with glibc keeping freed memory (no mmap, no trim), so buffers are reused
  without page faults, as the CUDA caching allocator does on GPU (ours vs Megatron only).
Times: per round the slowest rank, as wall-clock, process CPU and user CPU time (on an
oversubscribed shared box CPU time is the trustworthy one; user time leaves out the kernel's
page-fault work, i.e. what remains with a caching allocator, which glibc's "warm" mode only
approximates: heap fragmentation still hands out fresh pages at times); implementations
interleave round by round so they share the machine's load; medians over rounds, ratios as the
median of per-round ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import statistics
import time

import torch
import torch.distributed as dist

from peak_rss import peak_rss_growth, use_mmap_above  # benchmarks/peak_rss.py, next to this script

QWEN_VOCAB = 151_936  # Qwen2.5/3 padded embedding rows (a multiple of 128·TP for TP ≤ 8)
QWEN_TOKENIZER = 151_665  # ids the tokenizer can produce; the rest is padding

_TIMES = ("wall", "cpu", "user")
VARIANTS = [
    ("logprob+entropy", ["ours", "megatron_ce", "naive"]),
    ("logprob", ["ours", "megatron_ce", "naive"]),
    ("jsd", ["ours", "naive"]),
    ("topk", ["ours", "naive"]),
    ("topk-distill(sdpo)", ["ours", "naive"]),
]


class _GatherVocab(torch.autograd.Function):
    """The naive baseline's all-gather along the vocabulary; backward keeps this rank's slice."""

    @staticmethod
    def forward(ctx, shard, group):
        ctx.rank, ctx.local = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.local:(ctx.rank + 1) * ctx.local].contiguous(), None


def _naive_log_softmax(shard, group, vocab_size):
    full = shard if group is None else _GatherVocab.apply(shard, group)
    return torch.log_softmax(full[..., :vocab_size].float(), dim=-1)


def _naive_jsd(s, t, beta):
    """TRL's generalised JSD on log-probabilities (β = mixture weight of the teacher)."""
    log_m = torch.logaddexp(s + torch.log(torch.tensor(1 - beta)), t + torch.log(torch.tensor(beta)))
    return beta * (t.exp() * (t - log_m)).sum(-1) + (1 - beta) * (s.exp() * (s - log_m)).sum(-1)


def _with_tail(lp):
    log_sum = lp.logsumexp(-1, keepdim=True).clamp(max=-1e-7)
    return torch.cat([lp, torch.log(-torch.expm1(log_sum))], -1)


def _variant(op: str, impl: str, student, teacher, target, group, args) -> None:
    """One forward (+ backward) of ``op`` by ``impl``; the logits are leaves that require grad."""
    from rlsd_megatron import ops

    kw = dict(group=group, vocab_size=args.vocab_size, chunk_size=args.chunk_size)
    if impl == "megatron_ce":  # the reference point of both log-prob ops: −log p only
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # through a view, so that its in-place work on the leaf's storage is allowed
        vocab_parallel_cross_entropy(student.view_as(student), target, tp_group=group).sum().backward()
    elif op in ("logprob+entropy", "logprob"):
        entropy = op == "logprob+entropy"
        if impl == "ours":
            out = ops.token_log_probs(student, target, return_entropy=entropy, **kw)
            lp, ent = out if entropy else (out, None)
        else:
            log_p = _naive_log_softmax(student, group, args.vocab_size)
            lp = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            ent = -(log_p.exp() * log_p).sum(-1) if entropy else None
        (lp.sum() + (ent.sum() if entropy else 0)).backward()
    elif op == "jsd":
        if impl == "ours":
            loss = ops.generalized_jsd(student, teacher, beta=0.5, **kw)
        else:
            loss = _naive_jsd(*(_naive_log_softmax(z, group, args.vocab_size) for z in (student, teacher)), 0.5)
        loss.sum().backward()
    elif op == "topk":
        with torch.no_grad():
            if impl == "ours":
                ops.vocab_topk(student, args.k, group=group, vocab_size=args.vocab_size)
            else:
                full = student if group is None else _GatherVocab.apply(student, group)
                torch.topk(full[..., : args.vocab_size], args.k, dim=-1)
    elif op == "topk-distill(sdpo)":  # SDPO: student's top-k, tail bucket, JSD 0.5, teacher stop-grad
        if impl == "ours":
            loss = ops.topk_distillation_loss(student, teacher.detach(), args.k, support="student",
                                              divergence="jsd", beta=0.5, tail_bucket=True, **kw)
        else:
            s = _naive_log_softmax(student, group, args.vocab_size)
            with torch.no_grad():
                t = _naive_log_softmax(teacher, group, args.vocab_size)
            ids = s.detach().topk(args.k, dim=-1).indices
            loss = _naive_jsd(_with_tail(s.gather(-1, ids)), _with_tail(t.gather(-1, ids)), 0.5)
        loss.sum().backward()
    else:
        raise ValueError(f"unknown op {op!r}")


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def _set_allocator(libc, phase: str) -> None:
    """memory/cold: mmap above 128 KiB, unmapped on free. warm: heap only, never trimmed (one-way,
    so warm runs last)."""
    if phase == "warm":
        libc.mallopt(_M_MMAP_MAX, 0)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 40)
    else:
        use_mmap_above(libc, 128 * 1024)


def run_op(op: str, impls: list[str], args, phase: str) -> dict:
    """On every rank (or in-process on GPU): build one set of inputs, then either measure each
    implementation's peak memory once ("memory") or time them in interleaved rounds."""
    from megatron.core import tensor_parallel  # noqa: F401  (imported before anything is measured)

    from rlsd_megatron.ops.vocab_shard import release_cached_gradients

    group = dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    device = torch.device(args.device)
    libc = ctypes.CDLL("libc.so.6") if device.type == "cpu" else None
    if libc is not None:
        _set_allocator(libc, phase)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(1000 + rank)

    def logits():
        z = 2 * torch.randn(args.tokens, QWEN_VOCAB // world, generator=gen, device=device)
        return z.to(dtype).requires_grad_(True)

    student = logits()
    teacher = logits() if op in ("jsd", "topk-distill(sdpo)") else None
    target = torch.randint(0, args.vocab_size, (args.tokens,), generator=gen, device=device)
    if group is not None:  # the same targets on every rank
        dist.broadcast(target, src=0, group=group)

    def prepare(impl):
        fresh = student
        if impl == "megatron_ce":
            fresh = student.detach().clone().requires_grad_(True)
        for z in (student, teacher):
            if z is not None:
                z.grad = None
        if phase == "memory":  # count each gradient as a fresh allocation, cache or not
            release_cached_gradients()
        gc.collect()
        if libc is not None and phase != "warm":
            libc.malloc_trim(0)
        if group is not None:
            dist.barrier(group)
        return fresh

    def timed(impl, fresh):
        """(wall, CPU, user CPU) seconds. CPU time is what the op did even when the shared machine
        is oversubscribed and wall time mostly measures waiting for a core; user time leaves out
        the kernel's work, which here is almost all page faults on fresh buffers."""
        wall, cpu, user = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
        _variant(op, impl, fresh, teacher, target, group, args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - wall, time.process_time() - cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_utime - user)

    result = {impl: {"wall": [], "cpu": [], "user": []} for impl in impls}
    if phase == "memory":
        for impl in impls:
            fresh = prepare(impl)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                timed(impl, fresh)
                result[impl]["peak_bytes"] = torch.cuda.max_memory_allocated() - base
            else:
                with peak_rss_growth(libc) as peak:
                    timed(impl, fresh)
                result[impl]["peak_bytes"] = peak["bytes"]
            del fresh
        return result
    for round_ in range(args.repeats + 1):  # round 0 warms up (and, when warm, fills the heap)
        for impl in impls:
            if impl != "naive" or round_ <= args.naive_repeats:
                seconds = timed(impl, prepare(impl))
                if round_ > 0:
                    for kind, value in zip(_TIMES, seconds):
                        result[impl][kind].append(value)
    return result


def _phase_variants(variants, phase: str):
    """The warm phase compares ours with Megatron only: the heap never shrinks there, so the naive
    baseline's multi-GiB peaks would stay resident (and its cold-phase ratio is already decisive)."""
    if phase != "warm":
        return variants
    return [(op, [i for i in impls if i != "naive"]) for op, impls in variants if "megatron_ce" in impls]


def _collect(results: dict, op: str, impls: list[str], phase: str, per_rank: list[dict]) -> None:
    for impl in impls:
        runs = [rank_result[impl] for rank_result in per_rank]
        entry = results.setdefault((op, impl), {})
        if phase == "memory":
            entry["peak_mib"] = max(r["peak_bytes"] for r in runs) / 2**20
            print(f"  [memory] {op:20s} {impl:12s} peak +{entry['peak_mib']:8.1f} MiB/rank", flush=True)
        else:
            for kind in _TIMES:
                entry[f"{phase} {kind}"] = [max(t) for t in zip(*(r[kind] for r in runs))]  # slowest rank
            wall, cpu, user = (statistics.median(entry[f"{phase} {kind}"]) * 1e3 for kind in _TIMES)
            print(f"  [{phase}] {op:20s} {impl:12s} wall {wall:8.1f} ms  cpu {cpu:8.1f} ms  user {user:8.1f} ms  "
                  f"(median of {len(entry[f'{phase} wall'])}; wall min/max "
                  f"{1e3 * min(entry[f'{phase} wall']):.0f}/{1e3 * max(entry[f'{phase} wall']):.0f})", flush=True)


def _report(results: dict, variants, phases) -> None:
    timing = [f"{p} {kind}" for p in phases if p != "memory" for kind in _TIMES]
    print("\nsummary: ours / baseline (time ratio: median over rounds of ours/baseline, slowest rank each)")
    for op, impls in variants:
        ours = results[op, "ours"]
        for base in impls[1:]:
            other = results[op, base]
            cells = []
            if "peak_mib" in ours:
                ratio = ours["peak_mib"] / max(other["peak_mib"], 1e-9)
                cells.append(f"memory {ours['peak_mib']:6.0f} / {other['peak_mib']:6.0f} MiB = {ratio:6.2f}x")
            for phase in timing:
                if phase not in other:
                    continue
                pairs = [a / b for a, b in zip(ours[phase], other[phase])]
                cells.append(f"{phase} {statistics.median(pairs):4.2f}x")
            print(f"  {op:19s} vs {base:11s}  " + "   ".join(cells))
    print("targets: peak memory <= 0.55x naive; logprob+entropy time <= 1.3x Megatron CE alone "
          "(which computes no entropy)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="logits dtype")
    parser.add_argument("--vocab-size", type=int, default=QWEN_TOKENIZER, help="true vocabulary (rest is padding)")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk (default: the ops' default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of ours and Megatron per phase")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed rounds of the (slow) naive baseline")
    parser.add_argument("--phases", default="memory,cold,warm", help="any of memory,cold,warm, in this order")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default=None, help="comma-separated ops, e.g. logprob+entropy,jsd")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None
    variants = [(op, impls) for op, impls in VARIANTS if only is None or op in only]
    phases = args.phases.split(",") if args.device == "cpu" else ["memory", "warm"]

    world = args.tp if args.device == "cpu" else 1
    local = QWEN_VOCAB // world
    where = (f"TP={world} over gloo, 1 CPU thread per rank" if args.device == "cpu"
             else f"TP=1 on {torch.cuda.get_device_name()}")
    shard_mib = args.tokens * local * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20
    print(f"{args.tokens} tokens x {QWEN_VOCAB} vocab ({args.vocab_size} real), {args.dtype} logits, {where}; "
          f"shard {args.tokens}x{local} = {shard_mib:.0f} MiB per logits tensor; "
          f"chunk_size={args.chunk_size or 'default'}", flush=True)
    results: dict = {}
    if args.device == "cpu":
        from rlsd_megatron.parallel.local_pool import LocalProcessPool

        with LocalProcessPool(args.tp) as pool:
            for phase in phases:
                for op, impls in _phase_variants(variants, phase):
                    _collect(results, op, impls, phase, pool.run(run_op, op, impls, args, phase, timeout=3600))
    else:
        from rlsd_megatron.parallel.state import init_distributed, model_parallel

        init_distributed()
        with model_parallel(tp=1):
            for phase in phases:
                for op, impls in _phase_variants(variants, phase):
                    _collect(results, op, impls, phase, [run_op(op, impls, args, phase)])
    _report(results, variants, phases)


if __name__ == "__main__":
    main()
