"""Learner (TP/PP-sharded Megatron, gloo) → resharding → embedded engine, end to end.

Each case starts from a tiny random Hugging Face model (`tests.hf_models.random_hf_model`),
converts it to Megatron (`hf_to_megatron`), loads it into a learner at TP=2×PP=2, TP=2 (DP=2) or
PP=2 (DP=2) over 4 gloo processes, streams the learner's weights back to HF names in small
buckets (or writes them straight into its parameters) into the embedded engine on rank 0. Checks:
- every HF tensor the engine received is bit-identical to the original HF model's (the mapping
  round trip through the real resharding path: QKV/fc1 split, vocab padding, tied embeddings);
- the engine's log-probs of fixed token sequences equal the learner's within 1e-4 (fp32);
- sampled tokens: the engine's reported log-probs agree with the learner's (mismatch monitor);
- no more than one bucket is alive at any time on any rank (bucket path; the direct path into an
  in-process engine allocates none);
- a model config that does not match the learner raises a MappingError naming the parameter;
- FP8 rollout weights: the bucket stream of a TP=2 x PP=2 learner carries exactly the original HF
  tensors as `rollout.fp8` quantises them (projection weights whole, not per TP shard), each
  scale after its weight, still one bucket alive at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from rlsd_megatron.config import Config, ParallelConfig
from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_model

BUCKET_BYTES = 16 * 1024  # many buckets, boundaries inside layers
TEMPERATURE = 0.8
SIZES = dict(hidden_size=32, num_layers=4, ffn_hidden_size=64)
MODELS = {
    "llama": tiny_model("llama", **SIZES, max_position_embeddings=8192),
    "qwen2": tiny_model("qwen2", **SIZES),
    "qwen3": tiny_model("qwen3", **SIZES, kv_channels=16, tie_word_embeddings=True),
    # 16 experts of 1.5 KB per tensor: a bucket holds a few experts' tensors, never a layer's worth.
    "qwen3_moe": tiny_model("qwen3_moe", **SIZES, num_experts=16, moe_ffn_hidden_size=12),
    # Routed experts and a gated shared expert (TP-split like a dense MLP, its gate replicated).
    "qwen2_moe": tiny_model("qwen2_moe", **SIZES, num_experts=8, moe_ffn_hidden_size=12),
}
# (family, tp, pp, path[, ep]): "buckets" streams FlatBuckets into `update_weights` (SGLang's path),
# "direct" lets `sync_weights` write into the in-process engine's parameters. MoE at EP=2 x TP=2
# (Qwen3-MoE and Qwen2-MoE) and EP=2 x PP=2 (the EP group spans the two data-parallel replicas; each hosts an engine).
CASES = [("llama", 2, 2, "buckets"), ("qwen2", 2, 2, "direct"), ("qwen3", 2, 2, "buckets"), ("llama", 2, 1, "direct"),
         ("qwen3", 1, 2, "buckets"), ("qwen2", 1, 2, "direct"), ("qwen3_moe", 2, 1, "buckets", 2),
         ("qwen3_moe", 1, 2, "direct", 2), ("qwen2_moe", 2, 1, "buckets", 2)]


def fixed_sequences(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in (13, 7, 10)]


def learner_log_probs(learner, sequences: list[torch.Tensor], vocab: int) -> list[torch.Tensor] | None:
    """Per sequence [L]: out[t] = log softmax(z/T)[token t] at position t-1 (out[0] = 0), from the
    gathered vocabulary (independent of the vocab-parallel ops); None off the last stage."""
    from megatron.core import parallel_state

    def per_token(logits, mb):
        group = parallel_state.get_tensor_model_parallel_group()
        shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, logits.contiguous(), group=group)
        full = torch.cat(shards, -1)[..., :vocab].float()
        logp = torch.log_softmax(full / TEMPERATURE, -1).gather(-1, mb.targets[..., None]).squeeze(-1)
        return {"logp": logp}

    mb = learner.micro_batch(sequences)
    out = learner.forward([mb], per_token)
    return None if out is None else mb.to_sequences(out[0]["logp"])


def engine_log_probs(engine, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = []
        for seq in sequences:
            logp = torch.log_softmax(engine.model(seq[None]).logits[0].float() / TEMPERATURE, -1)
            out.append(torch.cat([torch.zeros(1), logp[:-1].gather(1, seq[1:, None]).squeeze(1)]))
        return out


def _from_first(value):
    """The first non-None value any rank holds, on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return next(v for v in values if v is not None)


def run_case(family: str, tp: int, pp: int, path: str, ep: int = 1) -> dict:
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import FlatBucket, MismatchMonitor, SamplingParams, reshard_to_hf, sync_weights
    from rlsd_megatron.rollout.embedded import EmbeddedEngine
    from rlsd_megatron.rollout.buckets import packed_bytes
    from rlsd_megatron.rollout.resharding import bucket_plan, plan_stream

    from megatron.core import parallel_state

    model = MODELS[family]
    hf = random_hf_model(model, seed=3)
    hf_state = hf_checkpoint_state(hf)
    full = dict(hf_to_megatron(hf_state.__getitem__, model))
    result: dict = {}
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=ep > 1 and tp > 1)
    with model_parallel(tp=tp, pp=pp, ep=ep):
        learner = Learner(Config(model=model, parallel=parallel))
        learner.load_full_state(full)
        # With EP, the rank of the other data-parallel replica (which holds the other experts)
        # hosts an engine too; rank 0's is the one checked.
        hosts = dist.get_rank() == 0 or (ep > 1 and parallel_state.get_model_parallel_group().rank() == 0)
        engine = EmbeddedEngine(model) if hosts else None
        FlatBucket.reset_peak()
        if path == "direct":
            sync_weights(learner.model, model, engine, version=7, bucket_bytes=BUCKET_BYTES)
            buckets = 0
        else:
            stream = reshard_to_hf(learner.model, model, bucket_bytes=BUCKET_BYTES)
            counted = [0]

            def counting(stream=stream):
                for bucket in stream:
                    counted[0] += 1
                    yield bucket
                    del bucket

            if engine is not None:
                engine.update_weights(counting(), version=7)
            else:
                for bucket in counting():
                    del bucket
            buckets = counted[0]
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, (FlatBucket.peak_bytes - FlatBucket.live_bytes, buckets))
        result["peaks"] = peaks
        result["largest_bucket"] = max(map(packed_bytes, bucket_plan(plan_stream(learner.model, model), BUCKET_BYTES)))

        sequences = fixed_sequences(model.vocab_size)
        want = _from_first(learner_log_probs(learner, sequences, model.vocab_size))
        prompts = [[5, 9, 2], [7, 1, 3, 8, 4], [6]]
        sampling = SamplingParams(n=2, temperature=TEMPERATURE, top_p=0.95, max_new_tokens=5, seed=1)
        generations = _from_first(engine.generate(prompts, sampling) if engine is not None else None)
        sampled = [torch.tensor(prompts[g.prompt_index] + g.token_ids) for g in generations]
        sampled_lp = _from_first(learner_log_probs(learner, sampled, model.vocab_size))
        if ep > 1 and engine is not None:  # the other replica's engine received the same weights
            greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)
            result["greedy"] = [g.token_ids for g in engine.generate(prompts, greedy)]
            result["greedy_replicas"] = [None] * 2
            dist.all_gather_object(result["greedy_replicas"], result["greedy"],
                                   group=parallel_state.get_data_parallel_group())
            with torch.no_grad():  # transformers' own greedy generation on the original weights
                result["greedy_hf"] = [hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=6)[0, len(p):]
                                       .tolist() for p in prompts]
        elif ep > 1:
            dist.all_gather_object([None] * 2, None, group=parallel_state.get_data_parallel_group())
        if dist.get_rank() == 0:
            got = engine_log_probs(engine, sequences)
            result["fixed_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, want))
            state = hf_checkpoint_state(engine.model)
            result["bit_exact"] = sorted(n for n in hf_state if not torch.equal(state[n], hf_state[n]))
            learner_lp = torch.cat([lp[len(prompts[g.prompt_index]):] for lp, g in zip(sampled_lp, generations)])
            engine_lp = torch.cat([torch.tensor(g.log_probs) for g in generations])
            result["sampled"] = MismatchMonitor(max_mean=1e-4).check(learner_lp, engine_lp, version=7)
            result["version"] = engine.health().weight_version
    return result


def mismatched_configs() -> dict:
    """Sync a llama learner while describing it with wrong configs; return each error message."""
    from dataclasses import replace

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import MappingError
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import sync_weights

    model = MODELS["llama"]
    messages = {}
    with model_parallel(tp=2, pp=2):
        learner = Learner(Config(model=model, parallel=ParallelConfig(tp=2, pp=2)))
        for label, wrong in {"shape": replace(model, ffn_hidden_size=48),
                             "unmapped": replace(model, tie_word_embeddings=True),
                             "missing": replace(model, family="qwen2", qkv_bias=True)}.items():
            try:
                sync_weights(learner.model, wrong, None, version=0)
                messages[label] = None
            except MappingError as exc:
                messages[label] = str(exc)
    return messages


def fp8_stream() -> dict | None:
    """Rank 0's received (name, tensor) stream of an FP8 sync of a Qwen3 learner at TP=2 x PP=2, with
    the quantised original HF tensors it should equal; None elsewhere."""
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.models.hf_mapping import expected_hf_shapes, hf_to_megatron
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.rollout import FlatBucket, reshard_to_hf
    from rlsd_megatron.rollout.fp8 import Fp8BlockConfig, fp8_rollout_tensors

    model = MODELS["qwen3"]
    hf_state = dict(random_hf_model(model, seed=5).state_dict())
    fp8 = Fp8BlockConfig(block=(16, 24), ignored_layers=("layers.3.mlp",))  # 24 does not divide 32 or 64
    with model_parallel(tp=2, pp=2):
        learner = Learner(Config(model=model, parallel=ParallelConfig(tp=2, pp=2)))
        learner.load_full_state(dict(hf_to_megatron(hf_state.__getitem__, model)))
        FlatBucket.reset_peak()
        received, largest = [], 0
        for bucket in reshard_to_hf(learner.model, model, bucket_bytes=BUCKET_BYTES, fp8=fp8):
            largest = max(largest, bucket.nbytes)
            received.extend((name, tensor.clone()) for name, tensor in bucket.named_tensors())
            del bucket
        peak = FlatBucket.peak_bytes - FlatBucket.live_bytes
    if dist.get_rank() != 0:
        return None
    want = list(fp8_rollout_tensors(((n, hf_state[n]) for n in expected_hf_shapes(model)), fp8))
    return {"received": received, "want": want, "peak": peak, "largest": largest}


def all_cases() -> dict:
    return {"cases": {case: run_case(*case) for case in CASES}, "errors": mismatched_configs(), "fp8": fp8_stream()}


@pytest.fixture(scope="module")
def results(dist_pool):
    return dist_pool(4).run(all_cases, timeout=600)[0]


@pytest.mark.parametrize("case", CASES, ids=["{}-tp{}-pp{}-{}".format(*case) + "".join(f"-ep{e}" for e in case[4:])
                                             for case in CASES])
def test_learner_to_embedded_engine(results, case):
    got = results["cases"][case]
    assert got["bit_exact"] == [], f"tensors changed on the way: {got['bit_exact']}"
    assert got["fixed_diff"] < 1e-4, got["fixed_diff"]
    assert got["sampled"].tokens > 0 and got["sampled"].max_abs < 1e-4, got["sampled"]
    assert got["version"] == 7
    if MODELS[case[0]].num_experts:  # greedy generation after the sync equals transformers' on the same weights
        assert got["greedy"] == got["greedy_hf"] and got["greedy_replicas"] == [got["greedy"]] * 2
    largest_bucket = got["largest_bucket"]
    assert largest_bucket <= BUCKET_BYTES
    for peak, buckets in got["peaks"]:
        if case[3] == "direct":  # no bucket at all
            assert peak == 0 and buckets == 0
        else:
            assert buckets > 3
            assert 0 < peak <= largest_bucket, f"{peak} bytes of buckets alive at once; the largest bucket is {largest_bucket}"


def test_mismatched_config_names_the_parameter(results):
    errors = results["errors"]
    assert errors["shape"] and "decoder.layers.0.mlp.linear_fc1.weight" in errors["shape"] and "(96, 32)" in errors["shape"]
    assert errors["unmapped"] and "output_layer.weight" in errors["unmapped"] and "without an HF mapping" in errors["unmapped"]
    assert errors["missing"] and "decoder.layers.0.self_attention.linear_qkv.bias" in errors["missing"]


def test_fp8_stream_carries_the_quantised_hf_tensors(results):
    got = results["fp8"]
    received, want = dict(got["received"]), dict(got["want"])
    assert sorted(received) == sorted(want)
    for name, tensor in want.items():
        assert received[name].dtype == tensor.dtype and torch.equal(received[name], tensor), name
    names = [name for name, _ in got["received"]]
    scales = [i for i, name in enumerate(names) if name.endswith("weight_scale_inv")]
    assert len(scales) == 4 * 7 - 3  # every projection but layer 3's MLP
    assert all(names[i - 1] == names[i].removesuffix("_scale_inv") for i in scales)
    assert received["model.layers.3.mlp.up_proj.weight"].dtype == torch.float32
    assert 0 < got["peak"] <= got["largest"]
