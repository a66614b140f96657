"""Config loading, overrides, HF config resolution and layout validation (each documented error)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from rlsd_megatron.config import Config, ConfigError, ModelConfig, ParallelConfig, load_config
from rlsd_megatron.config_checks import validate_config


def write_yaml(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides(tmp_path):
    path = write_yaml(tmp_path, "parallel:\n  tp: 2\noptimizer:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["parallel.pp=2", "optimizer.lr=3e-6", "algorithm.dual_clip=null",
                             "data.train_files=[a.jsonl, b.jsonl]"])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.optimizer.lr == 3e-6
    assert cfg.algorithm.dual_clip is None
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]


def test_int_accepted_for_float_fields():
    cfg = load_config(None, ["optimizer.clip_grad=2"])
    assert cfg.optimizer.clip_grad == 2.0 and isinstance(cfg.optimizer.clip_grad, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("parallel.tpp=2", r"unknown key\(s\) parallel\.tpp; valid keys of parallel: .*tp"),
        ("nosuchsection.x=1", r"unknown key\(s\) nosuchsection"),
        ("parallel.tp=two", r"parallel\.tp: expected int, got 'two'"),
        ("parallel.tp=true", r"parallel\.tp: expected int, got True"),
        ("algorithm.method=ppo", r"algorithm\.method: 'ppo' is not one of \['rlsd', 'grpo'"),
        ("parallel.tp", r"must look like section\.key=value"),
    ],
)
def test_bad_keys_and_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_hf_config_resolution_and_conflicts(tmp_path):
    hf = {
        "architectures": ["Qwen3ForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 512,
    }
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = load_config(None, [f"model.hf_config={tmp_path}"])
    m = cfg.model
    assert (m.family, m.num_query_groups, m.kv_channels, m.qk_layernorm, m.qkv_bias) == ("qwen3", 2, 32, True, False)
    assert (m.rope_theta, m.tie_word_embeddings, m.vocab_size) == (1e6, True, 1000)
    with pytest.raises(ConfigError, match=r"model\.hidden_size=32 but the HF config says 64"):
        load_config(None, [f"model.hf_config={tmp_path}", "model.hidden_size=32"])


def test_unsupported_hf_features_are_rejected(tmp_path):
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    base = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match="rope scaling type 'yarn'"):
        model_fields_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="low_freq_factor=2.0 is not supported"):
        model_fields_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}})
    with pytest.raises(ConfigError, match="not supported"):
        model_fields_from_hf({**base, "architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    fields = model_fields_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192}})
    assert fields["rope_scaling_factor"] == 32.0


def test_hf_config_round_trip():
    from rlsd_megatron.models.hf_config import hf_config_from_model, model_fields_from_hf

    for model in (
        ModelConfig(family="llama", num_query_groups=2, rope_scaling_factor=8.0),
        ModelConfig(family="qwen2", qkv_bias=True, tie_word_embeddings=True),
        ModelConfig(family="qwen3", qk_layernorm=True, kv_channels=32, num_query_groups=2),
    ):
        fields = model_fields_from_hf(hf_config_from_model(model))
        assert ModelConfig(**{**vars(model), **fields}) == model


def layout_config(**parallel) -> Config:
    cfg = Config(model=ModelConfig(num_layers=4, num_attention_heads=8, num_query_groups=4, hidden_size=64,
                                   ffn_hidden_size=128))
    cfg.parallel = ParallelConfig(**parallel)
    cfg.train.prompts_per_step = 4
    cfg.rollout.n = 4
    return cfg


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (dict(tp=3), 3, r"num_attention_heads=8 is not divisible by parallel\.tp=3"),
        (dict(tp=8), 8, r"num_query_groups=4 is not divisible by parallel\.tp=8"),
        (dict(pp=3), 3, r"num_layers=4 is not divisible by parallel\.pp=3"),
        (dict(pp=2, vpp=4), 2, r"num_layers=4 is not divisible by parallel\.pp\*parallel\.vpp=2\*4"),
        (dict(vpp=2), 1, r"parallel\.vpp=2 needs parallel\.pp >= 2"),
        (dict(tp=2), 3, r"world size 3 is not divisible by tp\*pp\*cp=2\*1\*1=2"),
        (dict(tp=2, dp=2), 2, r"parallel\.dp=2 but world size 2 = tp\*pp\*cp\*dp gives dp=1"),
        (dict(sequence_parallel=True), 1, r"sequence_parallel=true needs parallel\.tp > 1"),
        (dict(cp=2), 2, r"parallel\.cp=2 needs Transformer Engine attention"),
    ],
)
def test_layout_errors(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(layout_config(**parallel), world, cuda_available=False, te_available=False)


def test_sequence_length_must_split_into_2cp_chunks():
    cfg = layout_config(cp=2)
    cfg.train.max_seq_length = 1002
    with pytest.raises(ConfigError, match=r"max_seq_length=1002 is not divisible by 2\*parallel\.cp=4"):
        validate_config(cfg, 2, cuda_available=True, te_available=True)


def test_batch_arithmetic_errors():
    cfg = layout_config()
    cfg.train.prompts_per_step, cfg.rollout.n = 3, 3  # 9 sequences over dp=2
    with pytest.raises(ConfigError, match=r"9 sequences cannot be split evenly over dp=2"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg = layout_config()
    cfg.train.micro_batch_size = 3  # 16 sequences, dp=2: 8 per rank
    with pytest.raises(ConfigError, match=r"8 sequences per rank .* not a multiple of train\.micro_batch_size=3"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg = layout_config()
    cfg.train.distill_chunk_micro_batches = 0
    with pytest.raises(ConfigError, match=r"distill_chunk_micro_batches=0 must be >= 1 .* or null for parallel\.pp"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg.train.distill_chunk_micro_batches = 1
    validate_config(cfg, 2, cuda_available=False, te_available=False)


def test_fp8_and_te_need_a_gpu():
    cfg = layout_config()
    cfg.precision.fp8 = "hybrid"
    cfg.precision.params_dtype = "bf16"
    with pytest.raises(ConfigError, match=r"precision\.fp8=hybrid needs Transformer Engine layers on a GPU"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)
    cfg.precision.transformer_impl = "transformer_engine"
    with pytest.raises(ConfigError, match=r"transformer_impl=transformer_engine needs a CUDA GPU"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)
    validate_config(cfg, 1, cuda_available=True, te_available=True)  # fine on an H100 with TE


def test_vision_language_policy_on_sglang_without_fp8_weights():
    cfg = load_config("examples/configs/cpu_demo_visual.yaml")
    validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg.rollout.backend = "auto"
    validate_config(cfg, 2, cuda_available=False, te_available=False)  # auto on CPU: embedded
    validate_config(cfg, 2, cuda_available=True, te_available=True)  # auto on a GPU: SGLang sends the images
    cfg.rollout.fp8_weights, cfg.precision.params_dtype = True, "bf16"
    with pytest.raises(ConfigError, match=r"rollout\.fp8_weights=true with a vision-language policy"):
        validate_config(cfg, 2, cuda_available=True, te_available=True)


def test_fp8_rollout_weights_need_sglang_and_bf16():
    cfg = load_config(None, ["rollout.fp8_weights=true", "precision.params_dtype=bf16"])
    assert cfg.rollout.fp8_weights is True
    with pytest.raises(ConfigError, match=r"rollout\.fp8_weights=true needs the SGLang backend on a GPU: the embedded "
                                          r"engine \(rollout\.backend=auto, cuda available: False\)"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)
    cfg.rollout.backend = "embedded"
    with pytest.raises(ConfigError, match=r"rollout\.backend=embedded"):
        validate_config(cfg, 1, cuda_available=True, te_available=True)
    cfg.rollout.backend = "auto"
    validate_config(cfg, 1, cuda_available=True, te_available=True)  # SGLang on a GPU
    cfg.precision.params_dtype = "fp32"
    with pytest.raises(ConfigError, match=r"rollout\.fp8_weights=true needs precision\.params_dtype=bf16 \(got fp32\)"):
        validate_config(cfg, 1, cuda_available=True, te_available=True)


@pytest.mark.parametrize("overrides, message", [
    (["precision.recompute_granularity=full"], r"recompute_granularity=full needs precision\.recompute_method \(uniform "
     r"or block\) and precision\.recompute_num_layers \(got None and None\)"),
    (["precision.recompute_granularity=full", "precision.recompute_method=uniform"], r"\(got uniform and None\)"),
    (["precision.recompute_granularity=full", "precision.recompute_method=uniform", "precision.recompute_num_layers=0"],
     r"precision\.recompute_num_layers=0 must be >= 1"),
    (["precision.recompute_granularity=selective", "precision.recompute_num_layers=1"],
     r"precision\.recompute_method=None / recompute_num_layers=1 apply to recompute_granularity=full only \(got "
     r"selective\); unset them"),
    (["precision.recompute_method=block"], r"recompute_method=block / recompute_num_layers=None apply to "
     r"recompute_granularity=full only \(got none\)"),
])
def test_recompute_settings_megatron_would_refuse_or_ignore(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(load_config(None, overrides), 1, cuda_available=False, te_available=False)
    validate_config(load_config(None, ["precision.recompute_granularity=full", "precision.recompute_method=block",
                                       "precision.recompute_num_layers=1"]), 1, cuda_available=False, te_available=False)


def test_a_warm_start_needs_validation_rows():
    files = ["data.train_files=[train.jsonl]", "data.tokenizer_dir=tok", "warm_start.max_steps=10"]
    with pytest.raises(ConfigError, match=r"warm_start\.max_steps=10 measures greedy accuracy on the validation rows to "
                                          r"know when to stop, but there are none: set data\.val_files"):
        validate_config(load_config(None, files), 1, cuda_available=False, te_available=False)
    validate_config(load_config(None, [*files, "data.val_files=[val.jsonl]"]), 1, cuda_available=False,
                    te_available=False)
    validate_config(load_config(None, ["data.task=reversed_addition", "warm_start.max_steps=10"]), 1,
                    cuda_available=False, te_available=False)  # a built-in task has its own validation rows


def test_sglang_server_args_mapping_and_deterministic(tmp_path):
    from rlsd_megatron.rollout.provider import sglang_server_args

    path = write_yaml(tmp_path, "rollout:\n  sglang_server_args:\n    attention_backend: fa3\n")
    cfg = load_config(path, ["rollout.sglang_server_args.cuda_graph_max_bs=256"])
    assert cfg.rollout.sglang_server_args == {"attention_backend": "fa3", "cuda_graph_max_bs": 256}
    with pytest.raises(ConfigError, match=r"rollout\.sglang_server_args: expected a mapping with string keys, got 3"):
        load_config(None, ["rollout.sglang_server_args=3"])
    assert sglang_server_args(cfg.rollout) == {"attention_backend": "fa3", "cuda_graph_max_bs": 256}
    # SGLang honours per-sample seeds only in deterministic inference; explicit server args win.
    cfg.rollout.deterministic = True
    assert sglang_server_args(cfg.rollout)["enable_deterministic_inference"] is True
    cfg.rollout.sglang_server_args["enable_deterministic_inference"] = False
    assert sglang_server_args(cfg.rollout)["enable_deterministic_inference"] is False


def test_routing_replay_refusals():
    moe = ["model.family=qwen3_moe", "model.qk_layernorm=true", "model.num_experts=4", "rollout.routing_replay=true"]
    validate_config(load_config(None, moe), 1, cuda_available=False, te_available=False)
    with pytest.raises(ConfigError, match=r"rollout\.routing_replay=true needs an MoE policy \(model\.num_experts"):
        validate_config(load_config(None, ["rollout.routing_replay=true"]), 1, cuda_available=False, te_available=False)
    fp8 = load_config(None, [*moe, "precision.params_dtype=bf16", "precision.fp8=e4m3",
                             "precision.recompute_granularity=full", "precision.recompute_method=uniform",
                             "precision.recompute_num_layers=1"])
    with pytest.raises(ConfigError, match=r"routing_replay=true with precision\.fp8=e4m3 and precision\."
                                          r"recompute_granularity=full"):
        validate_config(fp8, 1, cuda_available=True, te_available=True)
    fp8.precision.recompute_granularity, fp8.precision.recompute_method, fp8.precision.recompute_num_layers = \
        "selective", None, None
    validate_config(fp8, 1, cuda_available=True, te_available=True)
    off = load_config(None, [*moe, "rollout.sglang_server_args.enable_return_routed_experts=false"])
    with pytest.raises(ConfigError, match=r"sets enable_return_routed_experts=false"):
        validate_config(off, 1, cuda_available=True, te_available=True)


def test_engine_tp_fits_in_one_replica():
    cfg = load_config(None, ["parallel.tp=4", "rollout.engine_tp=8", "precision.params_dtype=bf16"])
    with pytest.raises(ConfigError, match=r"rollout\.engine_tp=8 exceeds .* \(parallel\.tp x parallel\.cp = 4\)"):
        validate_config(cfg, 8, cuda_available=True, te_available=True)
    cfg.rollout.engine_tp = 4
    validate_config(cfg, 8, cuda_available=True, te_available=True)
    cfg.rollout.backend, cfg.rollout.engine_tp = "embedded", 8  # the embedded engine has no GPUs to take
    validate_config(cfg, 8, cuda_available=True, te_available=True)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        validate_config(layout_config(tp=3, pp=3), 9, cuda_available=False, te_available=False)
    text = str(info.value)
    assert "parallel.tp=3" in text and "parallel.pp=3" in text


def test_valid_layout_passes():
    validate_config(layout_config(tp=2, pp=2), 8, cuda_available=False, te_available=False)


def moe_layout_config(**parallel) -> Config:
    cfg = layout_config(**parallel)
    cfg.model = ModelConfig(family="qwen3_moe", num_layers=4, num_attention_heads=8, num_query_groups=4,
                            hidden_size=64, qk_layernorm=True, num_experts=6, moe_ffn_hidden_size=32)
    return cfg


@pytest.mark.parametrize(
    "parallel, world, message",
    [
        (dict(ep=4), 4, r"model\.num_experts=6 is not divisible by parallel\.ep=4"),
        (dict(ep=3, tp=2, sequence_parallel=True), 2, r"world size 2 is not divisible by tp\*ep\*pp=2\*3\*1=6"),
        (dict(ep=0), 1, r"parallel\.ep=0 must be >= 1"),
        (dict(tp=2), 2, r"an MoE model under parallel\.tp=2 needs parallel\.sequence_parallel=true"),
    ],
)
def test_expert_layout_errors(parallel, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(moe_layout_config(**parallel), world, cuda_available=False, te_available=False)


def test_shared_expert_width_must_divide_by_tp():
    cfg = moe_layout_config(tp=2, sequence_parallel=True)
    cfg.model = dataclasses.replace(cfg.model, family="qwen2_moe", qk_layernorm=False, qkv_bias=True,
                                    moe_shared_expert_intermediate_size=33)
    with pytest.raises(ConfigError, match=r"model\.moe_shared_expert_intermediate_size=33 is not divisible by "
                                          r"parallel\.tp=2 \(the shared expert is tensor-parallel"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg.model.moe_shared_expert_intermediate_size = 32
    validate_config(cfg, 2, cuda_available=False, te_available=False)


def test_load_balancing_loss_crosses_pipeline_stages():
    # Its counts cross pipeline stages (learner.moe_aux_loss).
    for parallel, world in ((dict(ep=2), 2), (dict(pp=2), 2), (dict(pp=2, ep=2), 4)):
        cfg = moe_layout_config(**parallel)
        cfg.model.moe_aux_loss_coeff = 0.001
        validate_config(cfg, world, cuda_available=False, te_available=False)


def test_interleaved_pipeline_needs_three_stages_and_groups_of_pp_micro_batches():
    # pp=2: the stages' activations and gradients swap (config_checks says what was measured).
    with pytest.raises(ConfigError, match=r"parallel\.vpp=2 with parallel\.pp=2: the interleaved schedule swaps"):
        validate_config(layout_config(pp=2, vpp=2), 2, cuda_available=False, te_available=False)
    cfg = layout_config(pp=4, vpp=2)
    cfg.model.num_layers = 8
    validate_config(cfg, 4, cuda_available=False, te_available=False)
    cfg.train.distill_chunk_micro_batches = 6
    with pytest.raises(ConfigError, match=r"distill_chunk_micro_batches=6 is not a multiple of parallel\.pp=4"):
        validate_config(cfg, 4, cuda_available=False, te_available=False)
    cfg.train.distill_chunk_micro_batches = None
    cfg.train.prompts_per_step, cfg.rollout.n = 1, 2  # 2 sequences per optimizer step on the one replica
    with pytest.raises(ConfigError, match=r"2 sequences per rank and optimizer step: the interleaved schedule"):
        validate_config(cfg, 4, cuda_available=False, te_available=False)


def test_expert_parallelism_needs_experts_and_valid_moe_layouts_pass():
    with pytest.raises(ConfigError, match=r"parallel\.ep=2 needs an MoE model \(model\.num_experts\)"):
        validate_config(layout_config(ep=2), 2, cuda_available=False, te_available=False)
    validate_config(moe_layout_config(ep=2, tp=2, pp=2, sequence_parallel=True), 8, cuda_available=False,
                    te_available=False)


PRESETS = ("rlsd", "grpo", "dapo", "drgrpo", "opd", "opsd", "sdpo", "grpo_opsd")


@pytest.mark.parametrize("method", PRESETS)
def test_method_presets_load_with_recipe_values(method):
    overrides = ["algorithm.teacher_model=/ckpt/teacher"] if method == "opd" else []
    cfg = load_config(f"examples/configs/{method}.yaml", overrides)
    assert cfg.algorithm.method == method
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (1e-6, 0.01, 1.0)
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens) == (256, 8, 4096)
    cfg.model = ModelConfig(vocab_size=1000)
    cfg.train.micro_batch_size = 1
    validate_config(cfg, 8, cuda_available=True, te_available=True)


def test_qwen3vl_8b_preset_is_the_papers_model_and_recipe():
    """examples/configs/rlsd_qwen3vl_8b.yaml: Qwen3-VL-8B-Instruct's shapes (its config.json read by
    our reader), the RLSD recipe of the text presets, the authors' image settings; valid on 8 GPUs
    with the overrides slurm/common.sh adds at launch."""
    from rlsd_megatron.models.hf_config import model_fields_from_hf
    from tests.models.test_vision_language import QWEN3_VL_8B_CONFIG

    cfg = load_config("examples/configs/rlsd_qwen3vl_8b.yaml", ["data.tokenizer_dir=/ckpt/Qwen3-VL-8B-Instruct"])
    assert cfg.model == ModelConfig(**model_fields_from_hf(QWEN3_VL_8B_CONFIG))
    assert cfg.algorithm == load_config("examples/configs/rlsd_8b.yaml").algorithm
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.clip_grad) == (1e-6, 0.01, 1.0)
    assert (cfg.train.prompts_per_step, cfg.rollout.n, cfg.rollout.max_new_tokens) == (256, 8, 4096)
    assert (cfg.data.min_pixels, cfg.data.max_pixels, cfg.data.image_key) == (262144, 1048576, "images")
    assert (cfg.data.question_key, cfg.data.answer_key, cfg.model.freeze_vision_tower) == ("problem", "answer", False)
    assert cfg.rollout.backend == "sglang"
    validate_config(cfg, 8, cuda_available=True, te_available=True)


def test_sdpo_paper_preset_is_the_papers_sdpo_run():
    """examples/configs/sdpo_paper.yaml: official SDPO's preset but for the demonstrations (shortest
    correct and incorrect sibling, at the authors' reward > 0), the live teacher and the thinking kept."""
    cfg = load_config("examples/configs/sdpo_paper.yaml")
    a, official = cfg.algorithm, load_config("examples/configs/sdpo.yaml")
    assert (a.method, a.sdpo_demonstrations, a.teacher_weights) == ("sdpo", "shortest_correct_and_incorrect", "live")
    assert (a.sdpo_success_threshold, a.sdpo_remove_thinking) == (0.05, False)
    # 0.05 splits the recipe's reward values (0.9·acc + 0.1·format) as the authors' > 0 does.
    r = cfg.reward
    for acc in (0, 1):
        for fmt in (0, 1):
            assert (r.accuracy_weight * acc + r.format_weight * fmt >= a.sdpo_success_threshold) == bool(acc or fmt)
    changed = {"sdpo_demonstrations", "sdpo_success_threshold", "sdpo_remove_thinking", "teacher_weights"}
    assert {k: v for k, v in vars(a).items() if k not in changed} == \
        {k: v for k, v in vars(official.algorithm).items() if k not in changed}
    for section in ("optimizer", "train", "rollout", "reward", "data", "precision"):
        assert getattr(cfg, section) == getattr(official, section), section
    cfg.model = ModelConfig(vocab_size=1000)
    cfg.train.micro_batch_size = 1
    validate_config(cfg, 8, cuda_available=True, te_available=True)


def test_rlsd_preset_is_the_recipe():
    a = load_config("examples/configs/rlsd.yaml").algorithm
    assert (a.lam0, a.lam_decay_steps, a.weight_clip_eps) == (0.5, 60, 0.2)
    assert (a.clip_low, a.clip_high, a.dual_clip, a.loss_agg, a.kl_coef) == (0.2, 0.28, 3.0, "token-mean", 0.0)
    assert (a.teacher_weights, a.teacher_sync_interval) == ("frozen_sync", 20)
    assert (a.lam_warmup_steps, a.negative_only, a.teacher_template) == (0, False, None)  # authors' script


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.method=opd"], r"method=opd scores rollouts with a separate teacher"),
        (["algorithm.teacher_weights=separate"], r"teacher_weights=separate is only for method opd"),
        (["algorithm.method=grpo", "algorithm.teacher_weights=frozen_sync"],
         r"algorithm.teacher_weights=frozen_sync has no effect with method grpo, which has no teacher, but would keep "
         r"a copy of the policy's weights \(memory, checkpoints\); set algorithm.teacher_weights=live, or use method "
         r"rlsd, opsd, sdpo, grpo_opsd"),
        (["algorithm.method=dapo", "algorithm.teacher_weights=ema"], r"teacher_weights=ema has no effect with method dapo"),
        (["algorithm.method=opsd"], r"method=opsd trains with a distillation loss"),
        (["algorithm.distill_loss=jsd"], r"distill_loss=jsd has no effect with method rlsd"),
        (["algorithm.method=opd", "algorithm.teacher_weights=separate", "algorithm.teacher_model=/t",
          "algorithm.distill_coef=0.5"],
         r"algorithm\.distill_coef=0\.5 has no effect with method opd \(only opsd, sdpo, grpo_opsd read it\)"),
        (["rollout.n=1", "train.prompts_per_step=8"], r"method=rlsd needs rollout.n >= 2"),
        (["algorithm.lam_warmup_steps=-5"], r"algorithm.lam_warmup_steps=-5 must be >= 0 \(0: no warm-up\)"),
        (["algorithm.method=grpo", "algorithm.negative_only=true"],
         r"algorithm\.negative_only=True has no effect with method grpo \(only rlsd reads it\); unset it"),
        (["algorithm.method=opsd", "algorithm.distill_loss=jsd", "algorithm.lam_warmup_steps=5"],
         r"algorithm\.lam_warmup_steps=5 has no effect with method opsd \(only rlsd reads it\)"),
        (["algorithm.opd_reward_weight=0.5"], r"algorithm\.opd_reward_weight=0\.5 has no effect with method rlsd "
                                              r"\(only opd reads it\)"),
        (["algorithm.teacher_template='{question} only'"],
         r"algorithm.teacher_template has placeholders \['question'\]; it must use \{answer\} and only "
         r"\['\{answer\}', '\{question\}'\]"),
        (["algorithm.teacher_template='{question}: {answer} in {units}'"],
         r"placeholders \['answer', 'question', 'units'\]"),
        (["algorithm.teacher_template='Hint {answer'"],
         r"algorithm.teacher_template 'Hint \{answer' is not a format string \(expected '\}' before end of string\); "
         r"write literal braces as \{\{ \}\}"),
        (["algorithm.method=grpo", "algorithm.teacher_template='{answer}'"],
         r"algorithm.teacher_template has no effect with method grpo"),
        (["algorithm.method=sdpo", "algorithm.distill_loss=topk", "algorithm.teacher_template='{answer}'"],
         r"teacher_template has no effect with method sdpo \(only rlsd, opsd, grpo_opsd"),
        (["algorithm.sdpo_demonstrations=shortest_correct_and_incorrect"],
         r"algorithm\.sdpo_demonstrations=shortest_correct_and_incorrect has no effect with method rlsd \(only sdpo "
         r"reads it: its teacher sees sibling rollouts\); unset it"),
        (["algorithm.method=sdpo", "algorithm.distill_loss=topk", "rollout.n=1", "train.prompts_per_step=8"],
         r"algorithm\.method=sdpo shows its teacher sibling rollouts of the same prompt: it needs rollout\.n >= 2, "
         r"got 1"),
        (["algorithm.method=sdpo", "algorithm.distill_loss=topk", "data.task=reversed_addition",
          "algorithm.sdpo_demonstrations=shortest_correct_and_incorrect"],
         r"the built-in task data\.task=reversed_addition cannot write in its tokens"),
    ],
)
def test_algorithm_contradictions(overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg, 1, cuda_available=False, te_available=False)


def test_valid_teacher_template_passes():
    for method in ("rlsd", "opsd", "grpo_opsd"):
        loss = "algorithm.distill_loss=jsd" if method != "rlsd" else "algorithm.distill_loss=none"
        cfg = load_config(None, [f"algorithm.method={method}", loss,
                                 "algorithm.teacher_template='{question}\n\nA solution: {answer}. Your turn, {{ok}}?'"])
        validate_config(cfg, 1, cuda_available=False, te_available=False)


@pytest.mark.parametrize("cuda", [False, True])
def test_greedy_top_k_needs_temperature_one(cuda):
    # SGLang treats top_k=1 as greedy and reports untempered log-probs; the learner uses z / T.
    cfg = load_config(None, ["rollout.top_k=1", "rollout.temperature=0.7"])
    with pytest.raises(ConfigError, match=r"rollout.top_k=1 samples greedily, and SGLang then reports untempered "
                                          r"log-probs while the learner uses rollout.temperature=0.7; set "
                                          r"rollout.temperature=1.0 .* or rollout.top_k=-1 \(or >= 2\)"):
        validate_config(cfg, 1, cuda_available=cuda, te_available=cuda)
    for fine in (["rollout.top_k=1", "rollout.temperature=1.0"], ["rollout.top_k=2", "rollout.temperature=0.7"],
                 ["rollout.top_k=-1", "rollout.temperature=0.7"],
                 ["rollout.val_top_k=1", "rollout.val_temperature=0.7"]):  # validation uses no engine log-probs
        validate_config(load_config(None, fine), 1, cuda_available=False, te_available=False)


def test_student_log_probs_in_update_needs_one_update_per_batch_and_no_mismatch_check():
    cfg = load_config(None, ["train.student_log_probs_in_update=true", "train.ppo_epochs=2"])
    with pytest.raises(ConfigError, match=r"ppo_epochs x optimizer_steps_per_batch = 2"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)
    cfg = load_config(None, ["train.student_log_probs_in_update=true", "rollout.max_logprob_mismatch=0.01"])
    with pytest.raises(ConfigError, match=r"rollout\.max_logprob_mismatch=0\.01 is checked before the update"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)
    validate_config(load_config(None, ["train.student_log_probs_in_update=true"]), 1, cuda_available=False,
                    te_available=False)


def test_freezing_a_vision_tower_needs_one():
    cfg = layout_config()
    cfg.model.freeze_vision_tower = True
    with pytest.raises(ConfigError, match=r"model\.freeze_vision_tower=true but the model has no vision tower"):
        validate_config(cfg, 1, cuda_available=False, te_available=False)


def test_settings_this_run_never_reads_are_refused():
    cfg = load_config("examples/configs/cpu_demo.yaml", ["reward.format_weight=0.5", "reward.answer_tag=res",
                                                          "reward.think_tag=think"])  # SDPO reads think_tag too
    with pytest.raises(ConfigError, match=r"reward\.format_weight, reward\.answer_tag only shape the math reward, "
                                          r"which data\.task=reversed_addition replaces; unset them$"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg = load_config("examples/configs/cpu_demo.yaml", ["optimizer.min_lr=1e-7", "optimizer.lr_decay_style=constant"])
    with pytest.raises(ConfigError, match=r"optimizer\.min_lr=1e-07 is where a decay ends"):
        validate_config(cfg, 2, cuda_available=False, te_available=False)
    cfg.optimizer.lr_decay_style = "cosine"
    validate_config(cfg, 2, cuda_available=False, te_available=False)
