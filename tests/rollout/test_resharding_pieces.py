"""The fast path of resharding (each TP shard mapped to HF pieces written in place) against the
reference (`unshard_tensors` then `megatron_to_hf`), for every rule kind and Megatron's layouts,
bit-exact; and the bucket's piece writer."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.hf_mapping import megatron_to_hf, name_pairs
from rlsd_megatron.models.sharding import ShardLayout, shard_tensor, unshard_tensors
from rlsd_megatron.rollout.buckets import FlatBucket, TensorSlot
from rlsd_megatron.rollout.resharding import ParamInfo, hf_pieces

MODEL = ModelConfig(family="qwen2", vocab_size=97, hidden_size=32, num_layers=1, num_attention_heads=8,
                    num_query_groups=4, ffn_hidden_size=48, qkv_bias=True, tie_word_embeddings=False)


def megatron_layout(name: str) -> ShardLayout:
    """Megatron-core's partitioning of each parameter (as `tensor_model_parallel` attributes say)."""
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return ShardLayout(name, 0, 1, False)
    if name.endswith("linear_fc1.weight"):
        return ShardLayout(name, 0, 2, False)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return ShardLayout(name, 1, 1, False)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return ShardLayout(name, 0, 1, True)
    return ShardLayout(name, None, 1, False)


def canonical_tensors() -> dict[str, torch.Tensor]:
    from rlsd_megatron.models.hf_mapping import hf_to_megatron, expected_hf_shapes

    gen = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=gen) for n, s in expected_hf_shapes(MODEL).items()}
    return dict(hf_to_megatron(hf.__getitem__, MODEL))


@pytest.mark.parametrize("tp", [2, 4])
def test_pieces_equal_the_reference_path(tp):
    kinds = {meg: (hf, kind) for meg, hf, kind in name_pairs(MODEL)}
    padded = 128 * tp
    for name, full in canonical_tensors().items():
        layout = megatron_layout(name)
        local = list(full.shape)
        if layout.vocab:
            local[0] = padded
        if layout.tp_dim is not None:
            local[layout.tp_dim] //= tp
        shards = [shard_tensor(full, layout, r, tp, local) for r in range(tp)] if layout.tp_dim is not None else [full]
        want = megatron_to_hf(name, unshard_tensors(shards, layout, MODEL.vocab_size), MODEL, kinds)
        info = ParamInfo(name, 0, layout, tuple(local), tuple(full.shape), full.dtype, kinds[name][1],
                         tuple((n, tuple(t.shape)) for n, t in want))
        got = hf_pieces(info, shards, MODEL, kinds)
        assert [n for n, _, _ in got] == [n for n, _ in want]
        slots, offset = [], 0
        for hf_name, tensor in want:
            size = tensor.numel() * 4
            slots.append(TensorSlot(hf_name, tuple(tensor.shape), torch.float32, offset, offset + size))
            offset += size
        bucket = FlatBucket(slots, "cpu")
        for hf_name, pieces, dim in got:
            bucket.put(hf_name, pieces, dim, truncate=layout.vocab)
        for (hf_name, got_tensor), (_, want_tensor) in zip(bucket.named_tensors(), want):
            assert torch.equal(got_tensor, want_tensor), f"{name} -> {hf_name} at tp={tp}"


def test_piece_writer_checks_shapes():
    bucket = FlatBucket([TensorSlot("w", (4, 6), torch.float32, 0, 96)], "cpu")
    with pytest.raises(Exception, match=r"'w' with shape \(4, 5\), its destination has shape \(4, 6\)"):
        bucket.put("w", [torch.ones(4, 3), torch.ones(4, 2)], 1)
    with pytest.raises(Exception, match=r"shape \(5, 6\)"):
        bucket.put("w", [torch.ones(3, 6), torch.ones(2, 6)], 0)  # too many rows without truncate
    bucket.put("w", [torch.ones(3, 6), torch.full((3, 6), 2.0)], 0, truncate=True)
    assert bucket.named_tensors()[0][1][:, 0].tolist() == [1, 1, 1, 2]
