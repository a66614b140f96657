"""HF ⇄ Megatron mapping: a tiny random HF model of each family, converted, gives the same
logits in our Megatron model (fp32, within 1e-5), and the round trip is bit-exact."""

from __future__ import annotations

import pytest
import torch

from rlsd_megatron.config import Config
from tests.hf_models import hf_checkpoint_state, random_hf_model, tiny_families, tiny_model
from rlsd_megatron.models.hf_mapping import (
    MappingError,
    check_hf_names,
    hf_to_megatron,
    megatron_to_hf,
)

FAMILIES = {**tiny_families(), "qwen3": tiny_model("qwen3", num_query_groups=1)}  # qwen3: MQA


def megatron_vs_hf_logits(family: str) -> float:
    from rlsd_megatron.learner.batch import padded_micro_batch
    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import model_parallel

    model = FAMILIES[family]
    hf = random_hf_model(model)
    hf_state = hf_checkpoint_state(hf)
    full = dict(hf_to_megatron(hf_state.__getitem__, model))
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, model.vocab_size, (n,), generator=gen) for n in (11, 6)]
    with torch.no_grad():
        want = [hf(seq[None]).logits[0] for seq in sequences]
    with model_parallel():
        learner = Learner(Config(model=model))
        learner.load_full_state(full)
        vocab = model.vocab_size
        (out,) = learner.forward([padded_micro_batch(sequences)], lambda logits, mb: {"logits": logits[..., :vocab]})
    return max(float((out["logits"][i, : len(s)] - want[i]).abs().max()) for i, s in enumerate(sequences))


def all_families() -> dict[str, float]:
    return {family: megatron_vs_hf_logits(family) for family in FAMILIES}


def test_converted_hf_models_give_the_same_logits(dist_pool):
    diffs = dist_pool(1).run(all_families)[0]
    assert all(diff < 1e-5 for diff in diffs.values()), diffs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_exact_and_names_check(family):
    model = FAMILIES[family]
    hf_state = hf_checkpoint_state(random_hf_model(model))
    check_hf_names(set(hf_state), model)
    back = {}
    for name, tensor in hf_to_megatron(hf_state.__getitem__, model):
        back.update(megatron_to_hf(name, tensor, model))
    expected = {k: v for k, v in hf_state.items() if not (model.tie_word_embeddings and k == "lm_head.weight")}
    assert sorted(back) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_mismatched_checkpoints_are_reported():
    model = FAMILIES["qwen2"]
    hf_state = hf_checkpoint_state(random_hf_model(model))
    with pytest.raises(MappingError, match=r"unexpected tensors \['model.layers.0.extra'\]"):
        check_hf_names(set(hf_state) | {"model.layers.0.extra"}, model)
    with pytest.raises(MappingError, match=r"missing tensors \['model.norm.weight'\]"):
        check_hf_names(set(hf_state) - {"model.norm.weight"}, model)
    bad = {**hf_state, "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3)}
    with pytest.raises(MappingError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\), the model config implies \(96, 64\)"):
        list(hf_to_megatron(bad.__getitem__, model))
    with pytest.raises(MappingError, match="no tensor 'model.norm.weight'"):
        list(hf_to_megatron({k: v for k, v in hf_state.items() if k != "model.norm.weight"}.__getitem__, model))
