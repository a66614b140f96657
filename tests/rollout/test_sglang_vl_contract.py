"""The SGLang backend of a vision-language policy against sglang 0.5.23's *source* (the wheel read
as a zip, as `test_sglang_contract.py` does; the wheel cannot be imported without its GPU stack).

- Requests: what `image_requests` builds takes 0.5.23's path for preprocessed images with our
  `input_ids` kept verbatim (source facts), and the wheel's own functions, executed on our
  prompts, give each image the offsets of its image-token run and the M-RoPE positions our
  learner uses (`models.mrope`): Qwen3-VL's from offsets and grids, Qwen2.5-VL's from
  `get_rope_index`, which needs `<|vision_start|>` before an image (without it they differ,
  which is why `image_requests` refuses such a prompt).
- Weights: the names the sync pushes for Qwen2.5-VL and Qwen3-VL (vision tower, merger, DeepStack
  mergers, language model) run through the wheel's own `load_weights` of those model classes,
  executed against a stand-in whose parameters are SGLang's names for them (below, each naming
  rule pinned to the wheel's module source): every pushed tensor reaches a weight loader, with
  the right shard of the fused q/k/v and gate/up parameters, and every parameter is loaded.
"""

from __future__ import annotations

import ast
import functools
from types import SimpleNamespace
from typing import Iterable, List, Optional, Tuple

import pytest
import torch

from rlsd_megatron.models.hf_mapping import expected_hf_shapes
from rlsd_megatron.models.mrope import mrope_position_ids
from rlsd_megatron.models.vision_config import saved_hf_name
from rlsd_megatron.rollout import sglang_engine
from rlsd_megatron.rollout.buckets import pack_buckets
from rlsd_megatron.rollout.engine import SamplingParams
from tests.hf_models import tiny_model, tiny_vision_language_model
from tests.rollout.test_sglang_contract import OURS, classes, source, wheel, without_decorators  # noqa: F401

VISION_START, VISION_END = 94, 93  # ids in the tiny models' vocabulary (image token 96)


def image_inputs(*grids):
    from rlsd_megatron.models.vision_language import ImageInputs

    grid = torch.tensor(grids)
    return ImageInputs(torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4), grid)


def prompt(*images: int, vision_start: bool = True) -> list[int]:
    """Text, then each image as `<|vision_start|>` + `images[k]` image tokens + `<|vision_end|>`."""
    ids = [5, 6]
    for count in images:
        ids += ([VISION_START] if vision_start else []) + [96] * count + [VISION_END, 7]
    return ids + [8, 9]


def exec_functions(wheel, module: str, names: dict[str, str], namespace: dict) -> dict:
    """The wheel's `names` ({function: class or ""}) of `module`, executed into `namespace`."""
    tree = source(wheel, module)
    for name, owner in names.items():
        body = classes(tree)[owner].body if owner else tree.body
        function = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
        exec(compile(ast.Module(body=[without_decorators(function)], type_ignores=[]), module, "exec"), namespace)
    return namespace


# -- requests ------------------------------------------------------------------------------------
def test_image_requests_take_the_preprocessed_path_with_our_tokens(wheel):
    model = tiny_vision_language_model("qwen3_vl")
    a, b = image_inputs([1, 4, 6]), image_inputs([1, 4, 6], [1, 8, 4])
    prompts = [prompt(6), [1, 2, 3], prompt(6, 8)]
    data = sglang_engine.image_requests(prompts, [a, None, b], 2, model)
    assert [len(d) for d in data] == [1, 1, 0, 0, 1, 1]  # prompt-major, n = 2, one item per prompt with images
    item = data[4][0]
    assert item["format"] == "processor_output" and item["pixel_values"] is b.pixel_values
    assert torch.equal(item["image_grid_thw"], b.image_grid_thw)
    assert sglang_engine.image_requests(prompts, None, 2, model) is None
    assert sglang_engine.image_requests(prompts, [None] * 3, 2, model) is None

    base = wheel.read("sglang/srt/multimodal/processors/base_processor.py").decode()
    # One processor-output item per request and modality; with input_ids and only preprocessed
    # items, load_mm_data returns our ids unchanged (no decode, no re-tokenisation, no resizing).
    assert "you must pass exactly one item" in base
    assert '"processor_output",' in base and "if input_ids is not None and self._all_mm_data_is_preprocessed(" in base
    assert "input_ids=input_ids,\n                images=list(image_data or [])," in base
    assert '"pixel_values",' in base[base.index("self.FEATURE_NAMES = ["):]  # the item's feature: our patches
    assert '"image_grid_thw": Modality.IMAGE,' in base
    # Offsets: the runs of the image token in our ids, then one item per image, split by its grid.
    assert "mm_item.offsets = self.get_mm_item_offsets(" in base and "get_new_expanded_mm_items(" in base
    qwen = wheel.read("sglang/srt/multimodal/processors/qwen_vl.py").decode()
    assert "any(self._is_preprocessed_input(item) for item in image_data)" in qwen  # never the cached raw path
    manager = wheel.read("sglang/srt/managers/tokenizer_manager.py").decode()
    assert "else (input_text or input_ids)" in manager  # no text given: the processor sees our ids
    assert "get_serving().tokenizer_path," in manager  # the processor comes from tokenizer_path
    io_struct = wheel.read("sglang/srt/managers/io_struct.py").decode()
    assert "isinstance(self.image_data[0], list)" in io_struct  # a list per request, kept as is
    server_fields = set()
    for name in wheel.namelist():
        if name.startswith("sglang/srt/arg_groups/fields/") and name.endswith(".py"):
            for cls in classes(ast.parse(wheel.read(name))).values():
                server_fields |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert "tokenizer_path" in server_fields and 'self.server_args["tokenizer_path"]' in OURS.read_text()
    assert "image_data=image_data" in OURS.read_text()


def test_image_requests_refuse_prompts_sglang_would_read_otherwise():
    qwen25, qwen3 = tiny_vision_language_model("qwen2_5_vl"), tiny_vision_language_model("qwen3_vl")
    x = image_inputs([1, 4, 6])
    with pytest.raises(ValueError, match=r"runs of \[4\] tokens for images of \[6\] tokens"):
        sglang_engine.image_requests([prompt(4)], [x], 1, qwen3)
    with pytest.raises(ValueError, match=r"runs of \[\] tokens for images of \[6\] tokens"):
        sglang_engine.image_requests([[1, 2]], [x], 1, qwen3)
    with pytest.raises(ValueError, match=r"without <\|vision_start\|> \(id 94\)"):
        sglang_engine.image_requests([prompt(6, vision_start=False)], [x], 1, qwen25, VISION_START)
    sglang_engine.image_requests([prompt(6, vision_start=False)], [x], 1, qwen3)  # Qwen3-VL places it by offsets
    with pytest.raises(ValueError, match="text-only model"):
        sglang_engine.image_requests([prompt(6)], [x], 1, tiny_model("qwen2"))


def test_image_and_video_tokens_are_never_sampled(wheel):
    _, params = sglang_engine.sampling_requests([[1, 2]], SamplingParams(n=1), banned_token_ids=(96, 95))
    assert params[0]["logit_bias"] == {"96": float("-inf"), "95": float("-inf")}
    sampling = wheel.read("sglang/srt/sampling/sampling_batch_info.py").decode()
    assert "logits.add_(self.logit_bias)" in sampling and "int(key): value" in sampling


@pytest.fixture(scope="module")
def sglang_mrope(wheel):
    """The wheel's `get_rope_index` (Qwen2.5-VL) and Qwen3-VL's offsets-based image positions."""
    namespace: dict = {}
    exec(compile(wheel.read("sglang/srt/layers/rotary_embedding/mrope_rope_index.py"), "mrope_rope_index.py", "exec"),
         namespace)
    helpers = exec_functions(wheel, "sglang.srt.multimodal.processors.qwen_vl",
                             {"_compute_image_only_mrope_positions_from_offsets": "QwenVLImageProcessor",
                              "_as_grid_batch": "QwenVLImageProcessor"},
                             {"torch": torch, "List": List, "Optional": Optional, "MultimodalDataItem": object})
    offsets = exec_functions(wheel, "sglang.srt.multimodal.processors.base_processor",
                             {"get_mm_items_offset": "BaseMultimodalProcessor"},
                             {"torch": torch, "List": List, "Tuple": Tuple})["get_mm_items_offset"]
    return namespace["get_rope_index"], helpers, offsets


def test_sglang_places_images_where_our_learner_does(sglang_mrope):
    get_rope_index, helpers, offsets_of = sglang_mrope
    grids = torch.tensor([[1, 4, 6], [1, 8, 4]])
    ours_of = functools.partial(mrope_position_ids, image_grid_thw=grids, image_token_id=96, spatial_merge_size=2)
    ids = torch.tensor(prompt(6, 8))
    ours = ours_of(ids)
    # Qwen2.5-VL: get_rope_index on the expanded ids (tokens_per_second: transformers' default 4;
    # a still image's time index is 0 whatever it is).
    rope = functools.partial(get_rope_index, spatial_merge_size=2, image_token_id=96, video_token_id=95,
                             vision_start_token_id=VISION_START, model_type="qwen2_5_vl", tokens_per_second=4,
                             image_grid_thw=grids)
    theirs, _ = rope(input_ids=ids[None])
    assert torch.equal(theirs[:, 0], ours)
    bare = torch.tensor(prompt(6, 8, vision_start=False))
    assert not torch.equal(rope(input_ids=bare[None])[0][:, 0], ours_of(bare))  # why the refusal
    # Qwen3-VL: offsets from our ids' image-token runs, one item per image with its own grid.
    offsets = offsets_of(ids, 96)
    assert [(e - s + 1) for s, e in offsets] == [6, 8]
    items = [SimpleNamespace(is_image=lambda: True, offsets=[o], model_specific_data={"image_grid_thw": g[None]})
             for o, g in zip(offsets, grids)]
    processor = SimpleNamespace(model_type="qwen3_vl", _spatial_merge_size=2, _as_grid_batch=helpers["_as_grid_batch"])
    positions, _ = helpers["_compute_image_only_mrope_positions_from_offsets"](
        processor, input_len=len(ids), mm_items=items, dtype=torch.long, device="cpu")
    assert torch.equal(positions[:, 0], ours)


def test_a_vl_engine_needs_the_processor_files(tmp_path):
    from rlsd_megatron.config import ConfigError

    model = tiny_vision_language_model("qwen3_vl")
    assert sglang_engine.processor_dir(tiny_model("qwen3"), None, None) is None  # text: no processor
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"needs the model's processor files .* data.tokenizer_dir=None"):
        sglang_engine.processor_dir(model, None, str(tmp_path / "config.json"))
    processor = tmp_path / "processor"
    processor.mkdir()
    (processor / "processor_config.json").write_text("{}")  # a processor without image settings: not enough
    with pytest.raises(ConfigError, match=r"needs the model's processor files"):
        sglang_engine.processor_dir(model, str(processor), str(tmp_path / "config.json"))
    (processor / "processor_config.json").write_text('{"image_processor": {"merge_size": 2}}')  # transformers 5's
    assert sglang_engine.processor_dir(model, str(processor), str(tmp_path)) == str(processor)
    (tmp_path / "preprocessor_config.json").write_text("{}")  # a released model's directory
    assert sglang_engine.processor_dir(model, None, str(tmp_path / "config.json")) == str(tmp_path)


# -- weights -------------------------------------------------------------------------------------
VL_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def sglang_parameter(name: str) -> str:
    """SGLang 0.5.23's parameter for transformers' tensor `name` of a Qwen2.5-VL / Qwen3-VL model,
    by the naming rules `test_sglang_vl_parameter_names_are_these` pins to the wheel's source."""
    name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
    name = name.replace(".attn.qkv.", ".attn.qkv_proj.")
    for shard in (".q_proj.", ".k_proj.", ".v_proj."):
        name = name.replace(shard, ".qkv_proj.")
    return name.replace(".gate_proj.", ".gate_up_proj.").replace(".up_proj.", ".gate_up_proj.")


def test_sglang_vl_parameter_names_are_these(wheel):
    text = lambda path: wheel.read(path).decode()  # noqa: E731
    q25, q3 = text("sglang/srt/models/qwen2_5_vl.py"), text("sglang/srt/models/qwen3_vl.py")
    vision_attention = text("sglang/srt/layers/attention/vision.py")
    assert "self.qkv_proj = QKVParallelLinear(" in vision_attention and "self.proj = RowParallelLinear(" in vision_attention
    # Qwen2.5-VL: decoder `model` (Qwen2Model: fused qkv_proj / gate_up_proj), tower `visual`, whose
    # blocks fuse gate/up by default and whose merger keeps HF's ln_q, mlp.0, mlp.2.
    assert "self.model = Qwen2Model(" in q25 and "self.visual = Qwen2_5_VisionTransformer(" in q25
    assert "fuse_gate_up: bool = True," in q25 and "self.gate_up_proj = MergedColumnParallelLinear(" in q25
    assert "self.norm1 = RMSNorm(dim" in q25 and "self.ln_q = RMSNorm(" in q25
    assert 'prefix=add_prefix("mlp.0", prefix),' in q25 and 'prefix=add_prefix("mlp.2", prefix),' in q25
    assert "self.patch_embed = Qwen2_5_VisionPatchEmbed(" in q25 and "self.proj = Conv3dLayer(" in q25
    # Qwen3-VL: the same decoder names (`model`, Qwen3: q_norm / k_norm), tower `visual` with
    # pos_embed, linear_fc1/2 MLPs, a merger and DeepStack mergers of norm + linear_fc1/2.
    assert "self.visual = Qwen3VLMoeVisionModel(" in q3 and "self.model = language_model_cls(" in q3
    for attribute in ("self.pos_embed = VocabParallelEmbedding(", "self.deepstack_merger_list = nn.ModuleList(",
                      "self.linear_fc1 = ColumnParallelLinear(", "self.linear_fc2 = RowParallelLinear(",
                      "self.norm = norm_layer(", "self.norm1 = norm_layer(dim)", "self.merger = Qwen3VLMoeVisionPatchMerger("):
        assert attribute in q3, attribute
    # The patch embedding keeps nn.Conv3d's [out, in, t, p, p] weight, the layout HF's tower has (and pushes).
    assert "torch.empty(out_channels, in_channels // groups, *self.kernel_size)" in text("sglang/srt/layers/conv.py")
    qwen3 = text("sglang/srt/models/qwen3.py")
    assert "self.q_norm = RMSNorm(" in qwen3 and "self.qkv_proj = QKVParallelLinear(" in qwen3


@pytest.mark.parametrize("model_type", sorted(VL_CLASSES))
def test_vl_loaders_take_every_tensor_we_push(wheel, model_type):
    model = tiny_vision_language_model(model_type)
    module_names = list(expected_hf_shapes(model))  # transformers' names: what the resharding streams
    # Renamed as SGLangEngine sends them (the names its NCCL path announces; the IPC payload's alike).
    assert "functools.partial(saved_hf_name, model)" in OURS.read_text()
    buckets = pack_buckets([(name, torch.zeros(1)) for name in module_names], bucket_bytes=64)
    pushed = [name for bucket in buckets
              for name in sglang_engine.bucket_spec(bucket, functools.partial(saved_hf_name, model))[0]]
    assert len(pushed) == len(module_names)
    expected = {sglang_parameter(n) for n in module_names}
    if model.tie_word_embeddings:
        expected.add("lm_head.weight")  # SGLang's head is the embedding; the loader fills both names
    calls: list[tuple[str, object]] = []

    class Parameter:
        def __init__(self, name):
            self.name = name

        def weight_loader(self, param, tensor, shard_id=None):
            calls.append((param.name, shard_id))

    params = {name: Parameter(name) for name in expected}
    layer_ids = exec_functions(wheel, "sglang.srt.layers.utils.common", {"get_layer_id": ""}, {"re": __import__("re")})
    namespace = exec_functions(
        wheel, f"sglang.srt.models.{model_type}", {"load_weights": VL_CLASSES[model_type]},
        {"get_layer_id": layer_ids["get_layer_id"], "default_weight_loader": None, "Iterable": Iterable,
         "Tuple": Tuple, "torch": torch})
    fake = SimpleNamespace(
        config=SimpleNamespace(tie_word_embeddings=model.tie_word_embeddings, encoder_only=False, language_only=False),
        pp_group=SimpleNamespace(is_last_rank=True), model=SimpleNamespace(start_layer=0, end_layer=model.num_layers),
        named_parameters=lambda remove_duplicate=True: params.items())
    namespace["load_weights"](fake, ((name, torch.empty(0)) for name in pushed))

    tie_copies = len(pushed) + 1 if model.tie_word_embeddings else len(pushed)
    assert len(calls) == tie_copies, "some pushed tensors were skipped by SGLang's loader"
    shards: dict[str, set] = {}
    for name, shard in calls:
        shards.setdefault(name, set()).add(shard)
    assert set(shards) == expected, sorted(expected ^ set(shards))[:5]
    for name, got in shards.items():
        want = {"q", "k", "v"} if ".self_attn.qkv_proj." in name else {0, 1} if ".gate_up_proj." in name else {None}
        assert got == want, (name, got)
    assert any(n.startswith("visual.") for n in shards) and any(".deepstack_merger_list." in n for n in shards) == (
        model_type == "qwen3_vl")
