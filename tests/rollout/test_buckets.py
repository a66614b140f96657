"""Bucket planning and lifetime (no process groups): bounded size, tight aligned layout of mixed
dtypes, errors that name the tensor, and at most one bucket alive when the consumer drops each one."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.models.hf_mapping import MappingError
from rlsd_megatron.rollout.buckets import FlatBucket, pack_buckets


def random_tensors(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for i in range(40):
        shape = tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(1, 3, (), generator=gen)),), generator=gen))
        dtype = torch.bfloat16 if 15 <= i < 25 else torch.float8_e4m3fn if i % 3 == 0 else torch.float32
        tensors.append((f"t{i}", torch.randn(shape, generator=gen).to(dtype)))
    tensors.append(("huge", torch.randn(3000)))  # 12000 bytes: over the bound below
    tensors.append(("after_huge", torch.randn(5)))
    return tensors


@pytest.mark.parametrize("bound", [1024, 4096, 10**6])
def test_buckets_are_bounded_tight_aligned_and_ordered(bound):
    tensors = random_tensors()
    seen = []
    for bucket in pack_buckets(tensors, bucket_bytes=bound):
        assert bucket.buffer.numel() == bucket.nbytes
        oversized = bucket.nbytes > bound
        assert not oversized or len(bucket.slots) == 1, f"{bucket.nbytes} bytes in {len(bucket.slots)} tensors"
        assert all(dict(tensors)[s.name].dtype == s.dtype for s in bucket.slots)
        offset, itemsize = 0, 8
        for slot in bucket.packed_slots():  # back to back, widest first: what FlattenedTensorBucket.empty rebuilds
            assert slot.start == offset and slot.start % slot.dtype.itemsize == 0
            assert slot.dtype.itemsize <= itemsize
            offset, itemsize = slot.end, slot.dtype.itemsize
        assert offset == bucket.nbytes
        seen.extend(bucket.named_tensors())
        del bucket
    assert [name for name, _ in seen] == [name for name, _ in tensors]
    for (name, got), (_, want) in zip(seen, tensors):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_mixed_dtypes_share_a_bucket_widest_first():
    """An FP8 weight, its fp32 scale and a bf16 norm, in stream order: one bucket, fp32 first."""
    tensors = [("norm", torch.ones(3, dtype=torch.bfloat16)), ("w", torch.ones(3, 5).to(torch.float8_e4m3fn)),
               ("w_scale_inv", torch.full((1, 1), 0.5))]
    (bucket,) = pack_buckets(tensors, bucket_bytes=64)
    assert [(s.name, s.start, s.end) for s in bucket.slots] == [("norm", 4, 10), ("w", 10, 25), ("w_scale_inv", 0, 4)]
    assert [s.name for s in bucket.packed_slots()] == ["w_scale_inv", "norm", "w"]
    for (name, got), (_, want) in zip(bucket.named_tensors(), tensors):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_at_most_one_bucket_alive_when_the_consumer_drops_each():
    tensors = random_tensors()
    FlatBucket.reset_peak()
    base = FlatBucket.live_bytes
    largest = 0
    for bucket in pack_buckets(tensors, bucket_bytes=2048):
        largest = max(largest, bucket.nbytes)
        del bucket
    assert FlatBucket.peak_bytes - base <= largest
    assert FlatBucket.live_bytes == base


def test_plan_mismatch_names_the_tensor():
    bucket = next(pack_buckets([("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.ones(2, 4))]))
    bucket._next = 0
    with pytest.raises(MappingError, match=r"'model.norm.weight' with shape \(5,\), its destination has shape \(4,\)"):
        bucket.put("model.norm.weight", torch.ones(5))
    with pytest.raises(MappingError, match=r"'lm_head.weight' where the plan expected 'model.norm.weight'"):
        bucket.put("lm_head.weight", torch.ones(2, 4))
    with pytest.raises(MappingError, match=r"'model.norm.weight' as torch.bfloat16, the plan holds torch.float32"):
        bucket.put("model.norm.weight", torch.ones(4, dtype=torch.bfloat16))


def test_bad_bound():
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        next(pack_buckets([("a", torch.ones(1))], bucket_bytes=0))


def test_recycled_cpu_buffers_never_overwrite_a_kept_view():
    tensors = [(f"t{i}", torch.full((256,), float(i))) for i in range(8)]  # 1 KiB each
    kept = []
    for k, bucket in enumerate(pack_buckets(tensors, bucket_bytes=1024)):
        if k % 2 == 0:
            kept.append(bucket.named_tensors()[0])  # a consumer that adopted the memory
        del bucket
    for name, view in kept:
        assert torch.equal(view, dict(tensors)[name]), name


def test_qwen3_30b_a3b_sync_plan_is_bounded_with_128_experts_per_layer():
    """The weight sync's bucket plan for Qwen3-30B-A3B's shapes (48 layers x 128 experts, 18 k
    expert tensors; bf16, the default 512 MiB buckets), in the stream's order: only a tensor over
    the bound (the embedding, the head) gets a bucket alone, every other bucket stays within it, so
    no bucket holds more than a fraction of one layer's experts (1.2 GB of them per layer)."""
    from rlsd_megatron.config import ModelConfig
    from rlsd_megatron.models.hf_mapping import expected_hf_shapes
    from rlsd_megatron.rollout.buckets import DEFAULT_BUCKET_BYTES, packed_bytes, plan_buckets

    model = ModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48, num_attention_heads=32,
                        num_query_groups=4, kv_channels=128, ffn_hidden_size=6144, qk_layernorm=True, num_experts=128,
                        moe_router_topk=8, moe_ffn_hidden_size=768, moe_norm_topk_prob=True)
    shapes = expected_hf_shapes(model)
    buckets = plan_buckets(((name, shape, torch.bfloat16) for name, shape in shapes.items()), DEFAULT_BUCKET_BYTES)
    assert sum(len(b) for b in buckets) == len(shapes) > 48 * 128 * 3
    for bucket in buckets:
        assert len(bucket) == 1 or packed_bytes(bucket) <= DEFAULT_BUCKET_BYTES, [s.name for s in bucket[:3]]
    layer_experts = 128 * 3 * 768 * 2048 * 2
    assert max(packed_bytes(b) for b in buckets if ".experts." in b[0].name) < layer_experts / 2
