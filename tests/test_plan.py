"""Memory planner against published figures (Megatron's bytes per parameter, Llama-70B size)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlsd_megatron.config import Config, ConfigError, ModelConfig
from rlsd_megatron.model_params import stage_params
from rlsd_megatron.plan import check_fits, plan_memory

# Llama-3-70B: 80 layers, d 8192, 64 heads / 8 KV groups, SwiGLU 28672, vocab 128256, untied.
LLAMA_70B = ModelConfig(family="llama", vocab_size=128256, hidden_size=8192, num_layers=80, num_attention_heads=64,
                        num_query_groups=8, ffn_hidden_size=28672, max_position_embeddings=8192,
                        rope_theta=500000.0)


def config(**parallel) -> Config:
    cfg = Config(model=LLAMA_70B)
    cfg.precision.params_dtype = "bf16"
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def test_llama_70b_parameter_count():
    total = stage_params(config(), first=True, last=True)
    assert total == pytest.approx(70.55e9, rel=0.002)  # Meta reports 70.6B


@pytest.mark.parametrize("distributed, dp, bytes_per_param", [(False, 1, 18), (True, 1, 18), (True, 4, 6 + 12 / 4),
                                                              (True, 8, 6 + 12 / 8)])
def test_static_bytes_per_parameter_match_megatron(distributed, dp, bytes_per_param):
    # Megatron-LM docs (distributed optimizer): bf16 params + fp32 grads: 18 bytes/param, or
    # 6 + 12/d with the distributed optimizer over d data-parallel ranks.
    cfg = config(tp=8, pp=4, dp=dp, use_distributed_optimizer=distributed)
    plan = plan_memory(cfg)
    params = plan.params / 2  # bf16 weights
    assert plan.learner_state / params == pytest.approx(bytes_per_param, rel=1e-6)


def test_70b_does_not_fit_on_one_node_and_fits_on_eight():
    cfg = config(tp=8, pp=1)
    cfg.train.micro_batch_size, cfg.train.max_seq_length = 1, 8192
    with pytest.raises(ConfigError, match="does not fit"):
        check_fits(cfg, world_size=8)
    cfg = config(tp=8, pp=4, sequence_parallel=True, use_distributed_optimizer=True)
    cfg.precision.recompute_granularity, cfg.precision.recompute_method = "full", "uniform"
    cfg.train.micro_batch_size, cfg.train.max_seq_length = 1, 8192
    cfg.rollout.mem_fraction_static = 0.4
    plan = check_fits(cfg, world_size=64)  # 8 nodes: tp 8 x pp 4 x dp 2
    assert plan.fits and "dp=2" in plan.layout


def test_recomputation_and_sequence_parallel_shrink_activations():
    base = config(tp=8, pp=4, dp=2)
    base.train.max_seq_length = 8192
    sp = config(tp=8, pp=4, dp=2, sequence_parallel=True)
    sp.train.max_seq_length = 8192
    full = config(tp=8, pp=4, dp=2, sequence_parallel=True)
    full.train.max_seq_length = 8192
    full.precision.recompute_granularity = "full"
    a, b, c = (plan_memory(cfg).activations for cfg in (base, sp, full))
    assert a > b > c


def test_teacher_copy_and_engine_are_counted_in_their_phases():
    cfg = config(tp=8, pp=4, dp=2)
    live = plan_memory(cfg)
    cfg.algorithm.teacher_weights = "frozen_sync"
    frozen = plan_memory(cfg)
    assert frozen.teacher_copy == live.params and live.teacher_copy == 0
    assert frozen.training_peak - live.training_peak == frozen.teacher_copy
    assert live.rollout_peak - live.learner_state == live.engine > 0


@pytest.mark.parametrize("teacher_weights, bytes_per_param",
                         [("live", 0), ("frozen", 2), ("frozen_sync", 2), ("ema", 4)])
def test_every_teacher_copy_is_counted(teacher_weights, bytes_per_param):
    cfg = config(tp=8, pp=4, dp=2)
    cfg.algorithm.teacher_weights = teacher_weights
    plan = plan_memory(cfg)
    assert plan.teacher_copy == plan.params // 2 * bytes_per_param  # bf16 weights; EMA kept in fp32


def distill_config(**train) -> Config:
    cfg = config(tp=8, pp=4, dp=2)
    cfg.algorithm.method, cfg.algorithm.distill_loss, cfg.algorithm.teacher_weights = "opsd", "jsd", "frozen"
    cfg.train.max_tokens_per_micro_batch = 8192
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def test_distillation_memory_is_one_chunk_of_teacher_logits():
    vocab_local = 129024 // 8  # 128256 padded to a multiple of 128 x TP, split over TP = 8
    tokens = 8192
    logits = tokens * vocab_local * 2  # bf16 [tokens, V/TP]
    workspace = 5 * (128 * 2**20 // (4 * vocab_local)) * vocab_local * 4  # five fp32 128 MiB chunk buffers
    one = plan_memory(distill_config(distill_chunk_micro_batches=1))
    # One micro-batch's teacher logits, the divergence's gradient for the student's, its workspace.
    assert one.distillation == logits + logits + workspace
    # In the training phase only: RLSD with the same frozen teacher differs by exactly this.
    rlsd = distill_config(distill_chunk_micro_batches=1)
    rlsd.algorithm.method, rlsd.algorithm.distill_loss = "rlsd", "none"
    rlsd_plan = plan_memory(rlsd)
    assert rlsd_plan.distillation == 0 and rlsd_plan.teacher_copy == one.teacher_copy > 0
    assert one.training_peak - rlsd_plan.training_peak == one.distillation
    assert one.rollout_peak == rlsd_plan.rollout_peak
    # Linear in the chunk, not in the step; the default chunk is parallel.pp = 4 micro-batches.
    assert plan_memory(distill_config(distill_chunk_micro_batches=3)).distillation - one.distillation == 2 * logits
    assert plan_memory(distill_config()).distillation - one.distillation == 3 * logits
    assert plan_memory(distill_config(distill_chunk_micro_batches=1, prompts_per_step=4096)).distillation == \
        one.distillation
    # A live teacher with two optimizer steps per batch scores both with a snapshot of the weights.
    live = distill_config(distill_chunk_micro_batches=1, optimizer_steps_per_batch=2)
    live.algorithm.teacher_weights = "live"
    assert plan_memory(live).distillation - one.distillation == one.params and plan_memory(live).teacher_copy == 0


# Qwen/Qwen3-8B's config.json (its published values).
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36, "model_type": "qwen3",
    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


# ---------------------------------------------------------------------------------------------
# The `rlsd-plan` command line


def plan_cli(capsys, *args: str) -> tuple[int, str, str]:
    from rlsd_megatron.plan import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_runs_the_trainers_layout_checks_for_a_gpu_cluster(capsys):
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8",
                                "parallel.tp=8", "parallel.pp=2")
    assert status == 2 and out == ""
    assert err == ("rlsd-plan: error: invalid configuration:\n  - world size 8 is not divisible by tp*pp*cp=8*2*1=16; "
                   "launch a multiple of 16 processes or change the layout\n")
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8", "parallel.tp=3")
    assert status == 2 and "GiB/GPU" not in out + err
    assert "  - model.num_attention_heads=32 is not divisible by parallel.tp=3; pick a tp that divides it\n" in err
    assert "  - model.num_query_groups=8 is not divisible by parallel.tp=3;" in err
    # CUDA and Transformer Engine are assumed, as on the cluster: FP8 is no error on this CPU machine.
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8",
                                "precision.fp8=e4m3")
    assert status == 0 and out.splitlines()[-1] == "fits" and err == ""


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps: expected int, got 'abc' (str)"),
    ("algorithm.method=x", "algorithm.method: 'x' is not one of ['rlsd', 'grpo', 'dapo', 'drgrpo', 'opd', 'opsd', "
                           "'sdpo', 'grpo_opsd']"),
    ("model.hf_config=/nope/Qwen3-8B", "model.hf_config: no config.json at '/nope/Qwen3-8B'; point it at the Hugging "
                                       "Face model directory (or its config.json) that the checkpoint was converted from"),
])
def test_cli_config_errors_are_one_line_and_status_2(capsys, override, message):
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8", override)
    assert (status, out, err) == (2, "", f"rlsd-plan: error: {message}\n")


def test_cli_says_which_model_it_plans(capsys):
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8")
    assert status == 0 and err == ""
    assert out.splitlines()[0] == ("model: 8.19B parameters (qwen3, 36 layers, hidden 4096, 32 heads / 8 KV groups, "
                                   "ffn 12288, vocab 151936) from the model.* fields of examples/configs/rlsd_8b.yaml")
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd.yaml", "--world-size", "8")
    assert status == 0
    assert err == ("rlsd-plan: warning: examples/configs/rlsd.yaml names no model (no model.hf_config and no model.* "
                   "shape fields): this plans the built-in 147.78K-parameter placeholder, not your model; add "
                   "model.hf_config=/path/to/hf_model_dir\n")
    assert out.splitlines()[0].endswith("from the built-in default (no model in the config)")


def test_cli_layout_that_does_not_fit_is_status_1(capsys):
    # 4 nodes with the learner resident while the engine generates (the preset offloads it, and then fits).
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_70b.yaml", "--world-size", "32",
                                "train.offload=none", "rollout.mem_fraction_static=0.45")
    assert status == 1 and out.startswith("model: 70.55B parameters")
    assert err.startswith("rlsd-plan: error: the layout does not fit in GPU memory:\nlayout: tp=8 pp=4 cp=1 dp=1")
    assert "DOES NOT FIT" in err


def test_cli_world_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "0")
    assert exit_info.value.code == 2
    assert "rlsd-plan: error: --world-size=0: give the number of GPUs of the run (1 or more)" in capsys.readouterr().err


def test_cli_opsd_at_8b_counts_the_frozen_teacher_and_one_chunk_of_its_logits(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_8B))
    status, out, err = plan_cli(capsys, "--config", "examples/configs/rlsd_8b.yaml", "--world-size", "8",
                                f"model.hf_config={tmp_path}", "algorithm.method=opsd",
                                "algorithm.teacher_weights=frozen", "algorithm.distill_loss=jsd")
    assert status == 0 and err == "", err
    rows = {line[:32].strip(): float(line[32:]) for line in out.splitlines()
            if line[32:].strip().replace(".", "").isdigit()}  # "name  GiB" rows of the table
    assert rows["teacher copy"] == rows["weights"] > 0  # the frozen copy: bf16 weights of this GPU's shard
    # One 20480-token micro-batch per chunk (PP = 1): its bf16 teacher logits over 152064 / 4 ids, the
    # divergence's gradient for the student's logits and its five fp32 128 MiB chunk buffers.
    vocab_local = 152064 // 4
    expected = 2 * 20480 * vocab_local * 2 + 5 * (128 * 2**20 // (4 * vocab_local)) * vocab_local * 4
    assert rows["distillation (one chunk)"] == round(expected / 2**30, 2) == 3.52
    assert rows["training phase peak"] <= rows["budget"] and rows["rollout phase peak"] <= rows["budget"]
    assert "distillation on the host: none" in out and out.splitlines()[-1] == "fits"


def test_qwen3_30b_a3b_counts_experts_per_expert_parallel_rank():
    """Qwen3-30B-A3B (48 layers of 128 experts of width 768, hidden 2048): 30.5B parameters as Qwen
    reports; at EP=8 each GPU holds 1/8 of the experts (28.99B of them) and all of the rest."""
    from rlsd_megatron.model_params import layer_params

    cfg = config()
    cfg.model = ModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48,
                            num_attention_heads=32, num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
                            qk_layernorm=True, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768)
    cfg.parallel.tp = cfg.parallel.pp = 1
    experts = 48 * layer_params(cfg, experts=True)
    assert experts == 48 * 128 * 3 * 2048 * 768
    whole = stage_params(cfg, first=True, last=True)
    assert whole == pytest.approx(30.5e9, rel=0.005)
    cfg.parallel.ep = 8
    assert stage_params(cfg, first=True, last=True) == whole - experts * 7 // 8


def test_qwen15_moe_a27b_counts_its_shared_expert_as_dense():
    """Qwen1.5-MoE-A2.7B (config.json as released): 14.3B parameters and 2.7B activated (top-4 of 60
    experts) as Qwen reports; its shared expert (3 x 5632 x 2048 per layer, and the [1, 2048] gate)
    is split by TP like a dense MLP, not by EP."""
    from rlsd_megatron.models.hf_config import model_fields_from_hf
    from rlsd_megatron.model_params import layer_params
    from tests.models.test_families import QWEN15_MOE_A27B

    cfg = config()
    cfg.model = ModelConfig(**model_fields_from_hf(QWEN15_MOE_A27B))
    cfg.parallel.tp = cfg.parallel.pp = 1
    experts = 24 * layer_params(cfg, experts=True)
    assert experts == 24 * 60 * 3 * 2048 * 1408
    whole = stage_params(cfg, first=True, last=True)
    assert whole == pytest.approx(14.3e9, rel=0.005)
    assert whole - experts * 56 // 60 == pytest.approx(2.7e9, rel=0.01)
    h = 2048  # per layer outside the experts: q/k/v with biases, o, 2 norms, router, shared expert and gate
    assert layer_params(cfg, experts=False) == 3 * (h * h + h) + h * h + 2 * h + 60 * h + 3 * 5632 * h + h
    cfg.parallel.ep = 4
    assert stage_params(cfg, first=True, last=True) == whole - experts * 3 // 4


def qwen3_30b_a3b(**parallel) -> Config:
    cfg = config(**parallel)
    cfg.model = ModelConfig(family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48,
                            num_attention_heads=32, num_query_groups=4, kv_channels=128, ffn_hidden_size=6144,
                            qk_layernorm=True, num_experts=128, moe_router_topk=8, moe_ffn_hidden_size=768)
    cfg.train.micro_batch_size, cfg.train.max_seq_length = 1, 4096
    return cfg


def test_expert_optimizer_state_shards_over_expert_data_parallel_ranks():
    """Megatron's expert layout is tp x ep x expert-dp x pp: at tp=2, dp=8, ep=4 the experts' fp32
    main weights and Adam moments (12 B/param) shard over 8/4 = 2 ranks, the rest over 8."""
    from rlsd_megatron.model_params import gpu_expert_params, layer_params

    cfg = qwen3_30b_a3b(tp=2, dp=8, ep=4)
    plan = plan_memory(cfg)
    experts = gpu_expert_params(cfg)
    assert experts == 48 * layer_params(cfg, experts=True) // 8 == 48 * 128 * 3 * 2048 * 768 // 8
    dense = plan.params // 2 - experts  # bf16 weights
    assert plan.optimizer == dense * 12 // 8 + experts * 12 // 2
    whole = qwen3_30b_a3b(tp=2, dp=8, ep=1)  # every expert on each GPU, all state over dp
    assert plan_memory(whole).optimizer == pytest.approx(plan_memory(whole).params // 2 * 12 / 8, abs=1)


def test_moe_activations_and_dispatcher_follow_the_routed_tokens():
    """A routed layer keeps top-k copies of each token and the experts' SwiGLU activations; the
    dispatcher's send + receive buffers hold one layer's [tokens x top-k, hidden] twice (bf16)."""
    from rlsd_megatron.plan import activation_bytes_per_token_layer

    cfg = qwen3_30b_a3b(tp=2, dp=8, ep=4)
    assert plan_memory(cfg).dispatcher == 2 * 4096 * 8 * 2048 * 2
    dense = qwen3_30b_a3b(tp=2, dp=8, ep=4)
    dense.model.family, dense.model.num_experts = "qwen3", None
    # Per token and layer: + 2·top-k·hidden copies + 4·top-k·width/TP activations + fp32 router
    # logits, − the dense 4·ffn/TP.
    extra = 2 * (2 * 8 * 2048 + 4 * 8 * 768 / 2 - 4 * 6144 / 2) + 4 * 128
    assert activation_bytes_per_token_layer(cfg) - activation_bytes_per_token_layer(dense) == pytest.approx(extra)
    assert plan_memory(dense).dispatcher == 0


def qwen2_5_vl_7b(**parallel) -> Config:
    """Qwen2.5-VL-7B-Instruct's shapes (its config.json): Qwen2-7B's decoder under a 32-block ViT."""
    from rlsd_megatron.config import VisionConfig

    cfg = config(**parallel)
    cfg.model = ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28,
        num_query_groups=4, ffn_hidden_size=18944, qkv_bias=True,
        vision=VisionConfig(model_type="qwen2_5_vl", depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                            out_hidden_size=3584, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                            window_size=112, fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
                            image_token_id=151655, mrope_section=[16, 24, 24]))
    cfg.train.micro_batch_size, cfg.train.max_seq_length = 1, 8192
    return cfg


def test_vision_language_policy_counts_its_tower_on_the_first_stage():
    """Qwen2.5-VL-7B: 8.29B parameters as its model card says, the ViT (0.67B) replicated over TP
    on the first stage; frozen, it has no gradients or optimizer state and keeps no activations;
    trained, its activations per image of max_pixels = 1048576 (1337 image tokens of 4 patches of
    14² pixels) are 4 patches x 32 blocks x (9 x 1280 + 4 x 3420) bf16 values per image token."""
    from rlsd_megatron.model_params import total_params, vision_params

    cfg = qwen2_5_vl_7b(tp=4, pp=2, dp=1, use_distributed_optimizer=False)
    tower = vision_params(cfg)
    assert total_params(cfg) == pytest.approx(8.29e9, rel=0.003) and tower == pytest.approx(0.675e9, rel=0.01)
    first, last = stage_params(cfg, first=True, last=False), stage_params(cfg, first=False, last=True)
    text_only = dataclasses.replace(cfg.model, vision=None)
    assert first - stage_params(dataclasses.replace(cfg, model=text_only), first=True, last=False) == tower
    trained = plan_memory(cfg)
    frozen_cfg = qwen2_5_vl_7b(tp=4, pp=2, dp=1, use_distributed_optimizer=False)
    frozen_cfg.model.freeze_vision_tower = True
    frozen = plan_memory(frozen_cfg)
    assert trained.params == frozen.params == max(first, last) * 2
    assert trained.grads - frozen.grads == tower * 4 and trained.optimizer - frozen.optimizer == tower * 12
    image_tokens = 1048576 // 28 ** 2
    per_token = 2 * 4 * 32 * (9 * 1280 + 4 * 3420)
    assert trained.activations - frozen.activations == pytest.approx(image_tokens * per_token * 2)  # x2: PP=2 in flight
    two = plan_memory(qwen2_5_vl_7b(tp=4, pp=2, dp=1, use_distributed_optimizer=False), images_per_sequence=2)
    assert two.activations - trained.activations == pytest.approx(image_tokens * per_token * 2)


def test_fused_output_layer_counts_one_chunk_of_logits():
    """8K tokens per micro-batch at TP=8: 8192 x 16128 (the padded vocabulary's shard) x 4 B of
    logits plus a 4096-token workspace; fused with 1024-token chunks: a chunk's logits, their
    gradient and its workspace (a quarter)."""
    plain = config(tp=8, pp=4, dp=2)
    plain.train.max_seq_length = 8192
    fused = config(tp=8, pp=4, dp=2)
    fused.train.max_seq_length = 8192
    fused.train.fused_output_layer, fused.train.fused_output_chunk_tokens = True, 1024
    vocab_local = 129024 // 8  # 128256 padded to a multiple of 128 x TP
    assert plan_memory(plain).logits == (8192 + 4096) * vocab_local * 4
    assert plan_memory(fused).logits == 3 * 1024 * vocab_local * 4
    assert plan_memory(plain).training_peak - plan_memory(fused).training_peak == (12288 - 3072) * vocab_local * 4


def test_offload_leaves_only_what_stays_in_the_rollout_phase():
    cfg = config(tp=8, pp=4, dp=2, sequence_parallel=True, use_distributed_optimizer=True)
    cfg.rollout.backend, cfg.algorithm.teacher_weights = "sglang", "frozen_sync"
    resident = plan_memory(cfg)
    cfg.train.offload = "copy"
    offloaded = plan_memory(cfg)
    # Weights + fp32 grads + optimizer leave; the teacher copy and the engine stay; training is unchanged.
    assert offloaded.rollout_peak == resident.rollout_peak - resident.learner_state
    assert offloaded.rollout_peak == offloaded.teacher_copy + offloaded.engine > 0
    assert offloaded.training_peak == resident.training_peak
    assert "off the GPU (train.offload)" in offloaded.table()
