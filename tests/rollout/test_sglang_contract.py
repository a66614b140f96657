"""Our SGLang backend against the pinned SGLang release's *source*, without installing it.

The 39 MB sglang wheel is downloaded once (`pip download --no-deps`) into
~/.cache/rlsd_megatron/wheels (or taken from $RLSD_SGLANG_WHEEL) and read as a zip: every
`self.engine.<method>(...)` call in `rollout/sglang_engine.py` is checked against `Engine`'s
signature (method exists, positional count, keyword names), every `sglang.Engine` keyword against
the `ServerArgs` fields, every request key against `SamplingParams`, every name we import from
sglang against the module that should define it, the request/response fields we read, the
flattened-bucket layout (mixed dtypes, FP8 included) against the wheel's own
`FlattenedTensorBucket` (executed from the wheel's file: it needs only torch), and the FP8
block-quantisation names and conventions `rollout.fp8` follows against SGLang's `Fp8Config`.
"""

from __future__ import annotations

import ast
import functools
import glob
import os
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from rlsd_megatron.config import RolloutConfig
from rlsd_megatron.rollout import sglang_engine
from rlsd_megatron.rollout.provider import sglang_server_args
from rlsd_megatron.rollout.buckets import pack_buckets
from rlsd_megatron.rollout.engine import SamplingParams
from rlsd_megatron.rollout.fp8 import Fp8BlockConfig, fp8_block_quantization_config, is_fp8_weight

VERSION = sglang_engine.SGLANG_VERSION
OURS = Path(sglang_engine.__file__)


@functools.lru_cache(None)
def wheel_path() -> str | None:
    if os.environ.get("RLSD_SGLANG_WHEEL"):
        given = os.environ["RLSD_SGLANG_WHEEL"]
        return given if Path(given).is_file() else None
    cache = Path.home() / ".cache" / "rlsd_megatron" / "wheels"
    pattern = str(cache / f"sglang-{VERSION}-*.whl")
    if not glob.glob(pattern):
        cache.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                            f"sglang=={VERSION}", "-d", str(cache)], check=True, capture_output=True, timeout=300)
        except (subprocess.SubprocessError, OSError):
            return None
    found = glob.glob(pattern)
    return found[0] if found else None


@pytest.fixture(scope="module")
def wheel():
    path = wheel_path()
    if path is None:
        pytest.skip(f"could not download sglang=={VERSION} (pip download --no-deps); set RLSD_SGLANG_WHEEL to a local wheel")
    with zipfile.ZipFile(path) as zf:
        yield zf


def source(zf: zipfile.ZipFile, module: str) -> ast.Module:
    return ast.parse(zf.read(module.replace(".", "/") + ".py"))


def classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def methods(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def our_engine_calls() -> list[tuple[str, int, set[str], int]]:
    """(method, positional count, keyword names, line) of every self.engine.<method>(...) call."""
    calls = []
    for node in ast.walk(ast.parse(OURS.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "engine"
                and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "self"):
            calls.append((node.func.attr, len(node.args), {k.arg for k in node.keywords}, node.lineno))
    return calls


def test_engine_methods_and_arguments_exist(wheel):
    engine = methods(classes(source(wheel, "sglang.srt.entrypoints.engine"))["Engine"])
    calls = our_engine_calls()
    assert {c[0] for c in calls} >= {"generate", "update_weights_from_tensor", "begin_weight_update",
                                     "end_weight_update", "flush_cache", "release_memory_occupation",
                                     "resume_memory_occupation", "update_weights_from_distributed",
                                     "init_weights_update_group", "shutdown"}
    for name, positional, keywords, line in calls:
        if name in ("loop", "tokenizer_manager"):
            continue
        assert name in engine, f"sglang_engine.py:{line}: Engine has no method {name!r}"
        args = engine[name].args
        params = [a.arg for a in args.posonlyargs + args.args][1:]  # drop self
        assert positional <= len(params), f"sglang_engine.py:{line}: {name} takes {len(params)} positional arguments"
        allowed = set(params) | {a.arg for a in args.kwonlyargs}
        unknown = keywords - allowed
        assert not unknown or args.kwarg, f"sglang_engine.py:{line}: Engine.{name} has no argument(s) {unknown}"


def test_engine_attributes_and_tokenizer_manager_pause(wheel):
    engine_src = wheel.read("sglang/srt/entrypoints/engine.py").decode()
    assert "self.tokenizer_manager = tokenizer_manager" in engine_src and "self.loop = " in engine_src
    manager = methods(classes(source(wheel, "sglang.srt.managers.tokenizer_manager"))["TokenizerManager"])
    for name in ("pause_generation", "continue_generation"):
        assert isinstance(manager[name], ast.AsyncFunctionDef) and len(manager[name].args.args) == 2
    io = classes(source(wheel, "sglang.srt.managers.io_struct"))
    mode = next(n for n in io["PauseGenerationReqInput"].body if isinstance(n, ast.AnnAssign) and n.target.id == "mode")
    assert {"abort", "retract", "in_place"} <= {c.value for c in ast.walk(mode.annotation) if isinstance(c, ast.Constant)}
    import inspect

    pause_mode = inspect.signature(sglang_engine.SGLangEngine).parameters["pause_mode"].default
    assert pause_mode in ("abort", "retract", "in_place")  # our default is one SGLang accepts
    assert "ContinueGenerationReqInput" in io


def test_server_args_and_sampling_fields(wheel):
    server_fields = set()
    for name in wheel.namelist():
        if name.startswith("sglang/srt/arg_groups/fields/") and name.endswith(".py"):
            for cls in classes(ast.parse(wheel.read(name))).values():
                server_fields |= fields(cls)
    ours = set()
    for node in ast.walk(ast.parse(OURS.read_text())):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "server_args" and isinstance(node.value, ast.Call)):
            ours |= {k.arg for k in node.value.keywords}
    assert ours >= {"model_path", "tp_size", "mem_fraction_static", "enable_memory_saver", "skip_tokenizer_init"}
    ours |= set(sglang_server_args(RolloutConfig(deterministic=True)))  # what other rollout fields imply
    assert not ours - server_fields, f"ServerArgs has no field(s) {ours - server_fields}"
    sampling = fields(classes(source(wheel, "sglang.srt.sampling.sampling_params"))["SamplingParams"])
    _, requests = sglang_engine.sampling_requests([[1, 2]], SamplingParams(n=2, top_k=5, stop_token_ids=(3,), seed=1),
                                                  banned_token_ids=(4,))
    assert not set(requests[0]) - sampling, f"SamplingParams has no field(s) {set(requests[0]) - sampling}"


def test_imported_names_exist(wheel):
    for node in ast.walk(ast.parse(OURS.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang"):
            tree = source(wheel, node.module)
            defined = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
            for alias in node.names:
                assert alias.name in defined, f"{node.module} defines no {alias.name}"


def test_init_custom_process_group_arguments(wheel):
    tree = source(wheel, "sglang.srt.utils.common")
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "init_custom_process_group")
    params = {a.arg for a in func.args.args + func.args.kwonlyargs}
    for node in ast.walk(ast.parse(OURS.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "init_custom_process_group":
            assert {k.arg for k in node.keywords} <= params, {k.arg for k in node.keywords} - params
            break
    else:
        raise AssertionError("sglang_engine.py no longer calls init_custom_process_group")


def test_request_and_response_fields(wheel):
    updater = wheel.read("sglang/srt/model_executor/model_runner_components/weight_updater.py").decode()
    flat = updater[updater.index("def _update_weights_from_flattened_bucket"):]
    assert 'flattened_tensor_bucket_dict["flattened_tensor"]' in flat and 'flattened_tensor_bucket_dict["metadata"]' in flat
    assert "_receive_bucketed_weights_from_distributed" in updater  # NCCL path rebuilds a tight bucket
    scheduler = wheel.read("sglang/srt/managers/scheduler_components/weight_updater.py").decode()
    assert "begin_weight_update() and end_weight_update()" in scheduler  # why we open a session
    common = wheel.read("sglang/srt/utils/common.py").decode()
    assert '("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata")' in common  # safe-unpickler allows it
    manager = wheel.read("sglang/srt/managers/tokenizer_manager.py").decode()
    for key in ('"output_ids"', 'meta_info["output_token_logprobs"]', '"finish_reason"'):
        assert key in manager, key
    batch = wheel.read("sglang/srt/managers/schedule_batch.py").decode()
    assert '"type": "stop"' in batch and '"type": "length"' in batch
    sampler = wheel.read("sglang/srt/layers/sampler.py").decode()
    assert "logprob_logits / sampling_info.temperatures" in sampler  # log-probs of the tempered distribution


def test_version_pins(wheel):
    metadata = wheel.read(f"sglang-{VERSION}.dist-info/METADATA").decode()
    assert f"\nVersion: {VERSION}\n" in metadata
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert f'"sglang=={VERSION}"' in pyproject


@pytest.fixture
def wheel_tensor_bucket(wheel, monkeypatch):
    """The wheel's own sglang.srt.weight_sync.tensor_bucket module (it imports only torch)."""
    for name in ("sglang", "sglang.srt", "sglang.srt.weight_sync"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = types.ModuleType("sglang.srt.weight_sync.tensor_bucket")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # before exec: @dataclass looks it up
    exec(compile(wheel.read("sglang/srt/weight_sync/tensor_bucket.py"), "tensor_bucket.py", "exec"), module.__dict__)
    return module


def test_flattened_bucket_layout_round_trips(wheel_tensor_bucket):
    assert wheel_tensor_bucket.FlattenedTensorBucket.supports_multi_dtypes
    tensors = [("a.weight", torch.randn(3, 5)), ("b.bias", torch.randn(7)), ("c", torch.randn(2, 2).bfloat16()),
               ("d", torch.randn(4).bfloat16()), ("e.weight", torch.randn(3, 3).to(torch.float8_e4m3fn)),
               ("e.weight_scale_inv", torch.rand(1, 1))]
    for bucket in pack_buckets(tensors, bucket_bytes=64):  # the second bucket mixes fp32, bf16 and fp8
        payload = sglang_engine.flattened_payload(bucket)
        rebuilt = wheel_tensor_bucket.FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"],
                                                           metadata=payload["metadata"]).reconstruct_tensors()
        assert sorted(n for n, _ in rebuilt) == sorted(s.name for s in bucket.slots)
        for name, got in rebuilt:
            want = dict(tensors)[name]
            assert got.dtype == want.dtype and torch.equal(got, want), name
        # NCCL path: the engine allocates from names/dtypes/shapes; the offsets must be ours.
        empty = wheel_tensor_bucket.FlattenedTensorBucket.empty(*sglang_engine.bucket_spec(bucket), "cpu")
        assert [(m.name, m.dtype, m.start_idx, m.end_idx) for m in empty.get_metadata()] == [
            (s.name, s.dtype, s.start, s.end) for s in bucket.packed_slots()]
        assert empty.get_flattened_tensor().numel() == bucket.nbytes


def test_fp8_block_weights_are_what_sglang_loads(wheel):
    """rollout.fp8 pushes `<module>.weight` (float8_e4m3fn) and `<module>.weight_scale_inv` (fp32,
    one per ceil-divided block, dequantised as fp8 * scale_inv) for a `quant_method: fp8` config."""
    assert '"fp8": Fp8Config' in wheel.read("sglang/srt/layers/quantization/__init__.py").decode()
    fp8 = wheel.read("sglang/srt/layers/quantization/fp8.py").decode()
    assert 'torch.float8_e4m3fn if is_checkpoint_fp8_serialized else params_dtype' in fp8
    assert 'layer.register_parameter("weight_scale_inv", scale)' in fp8
    assert ("(output_size_per_partition + block_n - 1) // block_n" in fp8
            and "(input_size_per_partition + block_k - 1) // block_k" in fp8)
    from_config = methods(classes(source(wheel, "sglang.srt.layers.quantization.fp8"))["Fp8Config"])["from_config"]
    keys = {c.value for c in ast.walk(from_config) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert {"weight_block_size", "activation_scheme", "ignored_layers", "modules_to_not_convert"} <= keys
    assert set(fp8_block_quantization_config()) - {"fmt"} <= keys  # fmt: informational, as in Qwen's FP8 configs
    utils = wheel.read("sglang/srt/layers/quantization/fp8_utils.py").decode()
    assert "return (x_q_block.to(torch.float32) * x_scale_repeat).to(dtype)" in utils  # block_quant_dequant
    common = wheel.read("sglang/srt/utils/common.py").decode()
    assert '("torch", "float8_e4m3fn")' in common  # the safe unpickler lets FP8 bucket metadata through


def test_ignored_layers_match_like_sglang(wheel):
    """`is_fp8_weight` skips exactly the projections SGLang's `is_layer_skipped` leaves unquantised,
    after `Fp8Config.from_config` adds a "model."-prefixed copy of every ignored name."""
    assert 'base = layer.removeprefix("model.")' in wheel.read("sglang/srt/layers/quantization/fp8.py").decode()
    tree = source(wheel, "sglang.srt.layers.quantization.utils")
    match_fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_module_path_match")
    namespace: dict = {}
    exec(compile(ast.Module(body=[match_fn], type_ignores=[]), "utils.py", "exec"), namespace)
    sglang_match = namespace["_module_path_match"]
    ignored = ["model.layers.1.mlp", "layers.0.self_attn.o_proj", "mlp.gate", "lm_head", "model.layers.1.self_attn."]
    ours = Fp8BlockConfig(ignored_layers=tuple(i.removeprefix("model.").rstrip(".") for i in ignored))
    theirs = [v for i in ignored for v in (i.removeprefix("model."), "model." + i.removeprefix("model."))]
    for layer in range(3):
        for module in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            prefix = f"model.layers.{layer}.{module}"
            skipped = any(sglang_match(i, prefix) for i in theirs)
            assert is_fp8_weight(prefix + ".weight", ours) != skipped, prefix


def test_llama_drops_block_fp8_scales(wheel):
    """Why `engine_fp8_format` refuses Llama: 0.5.23's Llama loader renames the scales to a name
    block-FP8 layers do not register (sglang PR #30234). When this fails, lift that refusal."""
    llama = wheel.read("sglang/srt/models/llama.py").decode()
    assert 'name = name.replace(".weight_scale_inv", ".weight_scale")' in llama
    for family in ("qwen2", "qwen3"):
        assert "weight_scale_inv" not in wheel.read(f"sglang/srt/models/{family}.py").decode(), family
    remaps = wheel.read("sglang/srt/model_loader/auto_loader.py").decode()
    assert "Qwen" not in "".join(line for line in remaps.splitlines() if "@register_weight_remap(" in line)


def test_outputs_are_parsed():
    outputs = [
        {"output_ids": [5, 2], "meta_info": {"output_token_logprobs": [(-0.5, 5, None), (-1.5, 2, None)],
                                             "finish_reason": {"type": "stop", "matched": 2}}},
        {"output_ids": [7], "meta_info": {"output_token_logprobs": [(-0.25, 7, None)],
                                          "finish_reason": {"type": "length", "length": 1}}},
    ]
    first, second = sglang_engine.parse_generations(outputs, n=2, version=3, prompt_offset=4)
    assert (first.prompt_index, first.sample_index, first.token_ids, first.log_probs, first.finish_reason) == (
        4, 0, [5, 2], [-0.5, -1.5], "stop")
    assert (second.sample_index, second.finish_reason, second.weight_version) == (1, "length", 3)
    outputs[0]["meta_info"]["output_token_logprobs"][1] = (-1.5, 9, None)
    with pytest.raises(RuntimeError, match="other tokens"):
        sglang_engine.parse_generations(outputs, n=2, version=3)


def test_routed_experts_are_what_sglang_returns(wheel):
    """Routing replay: we start the engine with `enable_return_routed_experts` and ask each request
    for `return_routed_experts` (both checked by the generic tests above: ServerArgs fields, Engine.
    generate keywords); SGLang then returns, per request, meta_info["routed_experts"] = base64 of
    the int32 [prompt + output - 1, layers, top-k] array, which `parse_generations` decodes."""
    assert sglang_engine.SGLangEngine.__init__.__kwdefaults__["return_routed_experts"] is False
    exec_fields = set()
    for cls in classes(source(wheel, "sglang.srt.arg_groups.fields.exec_")).values():
        exec_fields |= fields(cls)
    assert "enable_return_routed_experts" in exec_fields
    assert {"return_routed_experts", "routed_experts_start_len"} <= fields(
        classes(source(wheel, "sglang.srt.managers.io_struct"))["GenerateReqInput"])
    capturer = wheel.read("sglang/srt/state_capturer/routed_experts.py").decode()
    assert "topk_size = model_config.hf_text_config.num_experts_per_tok" in capturer
    assert "num_layers = model_config.hf_text_config.num_hidden_layers" in capturer
    base = wheel.read("sglang/srt/state_capturer/base.py").decode()
    assert "(num_tokens, num_layers, topk_size),\n            dtype=torch.int32" in base  # host buffer rows: tokens
    processor = wheel.read("sglang/srt/managers/scheduler_components/batch_result_processor.py").decode()
    assert "seqlen = len(req.origin_input_ids) + len(req.output_ids_through_stop)" in processor
    assert "expected_rows = max(0, seqlen - 1 - start_len)" in processor  # every token but the last sampled
    detokenizer = wheel.read("sglang/srt/managers/detokenizer_manager.py").decode()
    assert "pybase64.b64encode(item.numpy().tobytes())" in detokenizer
    manager = wheel.read("sglang/srt/managers/tokenizer_manager.py").decode()
    assert 'meta_info["routed_experts"] = val' in manager
    qwen3_moe = wheel.read("sglang/srt/models/qwen3_moe.py").decode()
    assert "self.topk = TopK(" in qwen3_moe and "layer_id=layer_id" in qwen3_moe  # captured per layer

    import base64

    from tests.hf_models import tiny_model

    moe = tiny_model("qwen3_moe")  # 2 layers, top-2 of 4 experts
    experts = torch.randint(0, 4, (2 + 3 - 1, 2, 2), dtype=torch.int32)  # prompt 2, output 3
    output = {"output_ids": [5, 2, 1], "meta_info": {
        "output_token_logprobs": [(-0.5, 5, None), (-1.5, 2, None), (-0.1, 1, None)], "finish_reason": "length",
        "routed_experts": base64.b64encode(experts.numpy().tobytes()).decode()}}
    generation, = sglang_engine.parse_generations([output], n=1, version=0, routed_experts=moe)
    assert generation.routed_experts.dtype == torch.uint8 and torch.equal(generation.routed_experts.long(), experts.long())
    assert sglang_engine.parse_generations([output], n=1, version=0)[0].routed_experts is None
    del output["meta_info"]["routed_experts"]
    with pytest.raises(RuntimeError, match="enable_return_routed_experts"):
        sglang_engine.parse_generations([output], n=1, version=0, routed_experts=moe)


def test_requests_carry_per_sample_seeds():
    ids, params = sglang_engine.sampling_requests([[1, 2], [3]], SamplingParams(n=2, seed=7), prompt_offset=10)
    assert ids == [[1, 2], [1, 2], [3], [3]]
    seeds = [p["sampling_seed"] for p in params]
    assert len(set(seeds)) == 4
    _, shifted = sglang_engine.sampling_requests([[3]], SamplingParams(n=2, seed=7), prompt_offset=11)
    assert [p["sampling_seed"] for p in shifted] == seeds[2:]
    assert params[0]["top_k"] == -1 and params[0]["stop_token_ids"] is None


def test_missing_sglang_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[gpu\].*rollout.backend=embedded"):
        sglang_engine.import_sglang()


def sglang_load_targets(wheel, module: str, model) -> dict[str, tuple]:
    """Where `module`'s (e.g. `qwen3_moe`) `<Model>ForCausalLM.load_weights`, executed as 0.5.23 writes
    its name logic (its stacked mapping, experts skipped there, then `FusedMoE.
    make_expert_params_mapping` run from the wheel, else the name itself), puts each HF tensor our
    weight sync pushes for `model`: (param name, shard id) / (param name, expert id, shard id) /
    (name,). Also checks the loader has the shape this replay assumes."""
    from rlsd_megatron.models.hf_mapping import expected_hf_shapes

    model_src = wheel.read(f"sglang/srt/models/{module}.py").decode()
    loader_class = next(name for name in classes(ast.parse(model_src)) if name.endswith("MoeForCausalLM"))
    loader = methods(classes(ast.parse(model_src))[loader_class])["load_weights"]
    stacked = next(ast.literal_eval(n.value) for n in ast.walk(loader)
                   if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "stacked_params_mapping")
    call = next(n for n in ast.walk(loader) if isinstance(n, ast.Call)
                and getattr(n.func, "attr", None) == "make_expert_params_mapping")
    ckpt_names = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "num_experts"}
    assert 'if "mlp.experts" in name:' in ast.get_source_segment(model_src, loader)  # experts skip the stacking
    fused = classes(source(wheel, "sglang.srt.layers.moe.fused_moe_triton.layer"))["FusedMoE"]
    make = methods(fused)["make_expert_params_mapping"]
    namespace: dict = {"List": list, "Tuple": tuple}
    exec(compile(ast.Module(body=[without_decorators(make)], type_ignores=[]), "layer.py", "exec"), namespace)

    mapping = namespace["make_expert_params_mapping"](None, num_experts=model.num_experts, **ckpt_names)
    loaded = {}
    for name in expected_hf_shapes(model):
        target = None
        for param_name, weight_name, shard_id in stacked:
            if weight_name in name and "mlp.experts" not in name:
                target = (name.replace(weight_name, param_name), shard_id)
                break
        else:
            for param_name, weight_name, expert_id, shard_id in mapping:
                if weight_name in name:
                    target = (name.replace(weight_name, param_name), expert_id, shard_id)
                    break
            else:
                target = (name,)
        loaded[name] = target
    prefix = "model.layers.1.mlp.experts"
    assert loaded[f"{prefix}.3.gate_proj.weight"] == (f"{prefix}.w13_weight", 3, "w1")
    assert loaded[f"{prefix}.3.up_proj.weight"] == (f"{prefix}.w13_weight", 3, "w3")
    assert loaded[f"{prefix}.2.down_proj.weight"] == (f"{prefix}.w2_weight", 2, "w2")
    assert loaded["model.layers.1.mlp.gate.weight"] == ("model.layers.1.mlp.gate.weight",)
    assert loaded["model.layers.0.self_attn.k_proj.weight"] == ("model.layers.0.self_attn.qkv_proj.weight", "k")
    experts = {v for n, v in loaded.items() if ".mlp.experts." in n}
    assert len(experts) == 3 * model.num_experts * model.num_layers  # every expert tensor a place of its own
    return loaded


def test_qwen3_moe_loader_takes_our_expert_names(wheel):
    """The names the weight sync pushes for Qwen3-MoE (every expert on its own, `mlp.experts.{j}.
    gate_proj/up_proj/down_proj`, the router as `mlp.gate`) run through 0.5.23's own
    `Qwen3MoeForCausalLM.load_weights` name logic (`sglang_load_targets`): each expert tensor lands
    in the fused `w13_weight` (gate = w1, up = w3) or `w2_weight` of its own expert id, the router
    and the rest by name, none skipped."""
    from rlsd_megatron.models.hf_config import hf_config_from_model
    from tests.hf_models import tiny_model

    model_src = wheel.read("sglang/srt/models/qwen3_moe.py").decode()
    # The router and the MoE block are registered as `mlp.gate` under `mlp`; experts counted by num_experts.
    assert 'prefix=add_prefix("gate", prefix)' in model_src and "self.mlp = Qwen3MoeSparseMoeBlock(" in model_src
    assert "num_experts=self.config.num_experts" in model_src
    model = tiny_model("qwen3_moe")
    assert hf_config_from_model(model)["num_experts"] == model.num_experts
    sglang_load_targets(wheel, "qwen3_moe", model)


def test_qwen2_moe_loader_takes_our_expert_and_shared_expert_names(wheel):
    """Qwen2-MoE through 0.5.23's `Qwen2MoeForCausalLM.load_weights` name logic: the routed experts
    as for Qwen3-MoE; the shared expert's gate/up stacked into its `gate_up_proj` (0 = gate, 1 = up),
    its down_proj and the [1, H] `shared_expert_gate` by name (SGLang's module and parameter names,
    checked in its source, since the loader skips names it does not have); the q/k/v biases into
    `qkv_proj.bias`. The config keys SGLang reads (qkv_bias, norm_topk_prob, the shared width) are
    ones our HF config writes."""
    from rlsd_megatron.models.hf_config import hf_config_from_model
    from tests.hf_models import tiny_model

    model_src = wheel.read("sglang/srt/models/qwen2_moe.py").decode()
    assert "self.mlp = Qwen2MoeSparseMoeBlock(" in model_src and 'prefix=add_prefix("gate", prefix)' in model_src
    assert 'prefix=add_prefix("shared_expert", prefix)' in model_src
    assert "self.shared_expert_gate = torch.nn.Linear(config.hidden_size, 1, bias=False)" in model_src
    assert "F.sigmoid(self.shared_expert_gate(hidden_states))" in model_src  # the gate scales as HF's
    mlp = ast.get_source_segment(model_src, classes(ast.parse(model_src))["Qwen2MoeMLP"])
    assert "self.gate_up_proj = MergedColumnParallelLinear(" in mlp and "self.down_proj = RowParallelLinear(" in mlp
    for read in ('getattr(config, "qkv_bias", True)', "renormalize=config.norm_topk_prob",
                 "config.shared_expert_intermediate_size", "num_experts=self.config.num_experts"):
        assert read in model_src, read
    model = tiny_model("qwen2_moe")
    hf = hf_config_from_model(model)
    assert (hf["qkv_bias"], hf["norm_topk_prob"], hf["shared_expert_intermediate_size"]) == (True, False, 24)
    loaded = sglang_load_targets(wheel, "qwen2_moe", model)
    shared = "model.layers.1.mlp.shared_expert"
    assert loaded[f"{shared}.gate_proj.weight"] == (f"{shared}.gate_up_proj.weight", 0)
    assert loaded[f"{shared}.up_proj.weight"] == (f"{shared}.gate_up_proj.weight", 1)
    assert loaded[f"{shared}.down_proj.weight"] == (f"{shared}.down_proj.weight",)
    assert loaded["model.layers.1.mlp.shared_expert_gate.weight"] == ("model.layers.1.mlp.shared_expert_gate.weight",)
    assert loaded["model.layers.0.self_attn.v_proj.bias"] == ("model.layers.0.self_attn.qkv_proj.bias", "v")


def without_decorators(function: ast.FunctionDef) -> ast.FunctionDef:
    """`function` without its decorators (a classmethod executed as a plain function of `cls`)."""
    function.decorator_list = []
    return function
