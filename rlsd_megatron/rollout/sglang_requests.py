"""Our requests and results in SGLang's terms (pure: tested on CPU): `sampling_requests` (one
request per sample), `image_requests` (their `image_data`), `parse_generations` (outputs →
`Generation`s, with the routed experts for routing replay). `SGLangEngine` (`sglang_engine.py`)
sends them; `tests/rollout/test_sglang_contract.py` checks the fields against sglang==0.5.23.

Images (a vision-language policy, `model.vision`). Each request of a prompt with images carries
them as one `image_data` item `{"format": "processor_output", "pixel_values", "image_grid_thw"}`:
the pixel patches and grids our image processor made (`data.images`), which the learner also
reads. With that form and `input_ids`, 0.5.23 keeps our tokens verbatim (`load_mm_data`'s fast
path for preprocessed items; the runs of image tokens give each image's offsets) and runs no image
processor of its own. Raw images (bytes, PIL) would instead be decoded, resized by the engine's
processor with its own pixel bounds and re-tokenised (decode → text → tokens, which can drift), so
the engine's prompt could differ from the one the learner scores. Hence `input_ids` hold the
expanded image tokens, one per vision-tower output embedding (t·h·w / merge²), as our prompts do.
SGLang then places the image positions (M-RoPE) as our `models.mrope` does: Qwen3-VL's from those
offsets and grids (`_compute_image_only_mrope_positions_from_offsets`), Qwen2.5-VL's with
`get_rope_index`, which finds an image only where `<|vision_start|>` precedes its tokens (the chat
template always writes it; `image_requests` refuses a prompt without it). 0.5.23 takes exactly one
processor-output item per request, so a prompt's images go as one item (its grids split it). Each
of a prompt's n requests (one per sample, for the seeds) carries the same patch tensors, which the
engine pickles to its scheduler and hashes once per request: a cost to measure on GPU (a 1024-token
image is 4096 fp32 patches of 1536 values, 25 MB).
The engine builds its multimodal processor even then (`TokenizerManager.init_tokenizer_and_processor`),
from `tokenizer_path`: a VL engine needs the model's processor files (`processor_path`).
A response never holds an image or video token (the learner would find an image token without an
image): those get a logit bias of -inf. SGLang applies it before it computes log-probs, so its
log-probs are of the distribution without them, log(1 - p(image or video token)) above the
learner's (the embedded engine reports the unrenormalised ones); for a trained model p is ~0.

Routed experts (`return_routed_experts=True`, routing replay): the engine runs with
`enable_return_routed_experts` and each request of a training draw (`SamplingParams.
return_routed_experts`; validation and evaluation do not ask) asks for
`return_routed_experts`; SGLang then returns `meta_info["routed_experts"]`, the base64 of an int32
[prompt + output - 1, layers, top-k] array (`RoutedExpertsCapturer`: every token it ran, from
`routed_experts_start_len=0`), which `parse_generations` turns into `Generation.routed_experts`.

Log-probs: SGLang returns log_softmax(z / T) of the sampled token before top-k/top-p (greedy:
T = 1), the convention of `rollout.engine`.

Seeds: 0.5.23 reads a request's `sampling_seed` only when the engine runs with
`enable_deterministic_inference=True` (`SamplingBatchInfo.from_schedule_batch`; that mode also
switches to the pytorch sampler and batch-invariant kernels). Otherwise the seed is ignored and
sampling follows the scheduler's global RNG: `SGLangEngine.generate` warns once.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.rollout.engine import Generation, SamplingParams, compact_expert_ids, sample_seed

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def sampling_requests(prompts: Sequence[Sequence[int]], sampling: SamplingParams, prompt_offset: int = 0,
                      banned_token_ids: Sequence[int] = ()) -> tuple[list[list[int]], list[dict]]:
    """One SGLang request per sample, prompt-major: (input_ids, sampling_params dicts).
    `banned_token_ids` are never sampled (a logit bias of -inf, see the module docstring)."""
    input_ids, params = [], []
    for i, prompt in enumerate(prompts):
        for j in range(sampling.n):
            request = {
                "max_new_tokens": sampling.max_new_tokens,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "presence_penalty": sampling.presence_penalty,
                "stop_token_ids": list(sampling.stop_token_ids) or None,
                "skip_special_tokens": False,
                "no_stop_trim": True,
            }
            if sampling.seed is not None:
                request["sampling_seed"] = sample_seed(sampling.seed, prompt_offset + i, j)
            if banned_token_ids:
                request["logit_bias"] = {str(int(t)): float("-inf") for t in banned_token_ids}
            input_ids.append([int(t) for t in prompt])
            params.append(request)
    return input_ids, params


def image_requests(prompts: Sequence[Sequence[int]], images: Sequence[Any] | None, n: int, model: ModelConfig,
                   vision_start_token_id: int | None = None) -> list[list[dict]] | None:
    """SGLang `image_data` for `sampling_requests`' requests (prompt-major, `n` per prompt): one
    processor-output item per prompt with images (`ImageInputs`), [] for a text prompt; None when
    no prompt has images. Raises ValueError when a prompt's image tokens do not match its images
    (one run of t·h·w / merge² image tokens per image; for Qwen2.5-VL each run right after
    `vision_start_token_id`, see the module docstring)."""
    from rlsd_megatron.data.images import image_token_counts

    if images is None or all(x is None for x in images):
        return None
    if model.vision is None:
        raise ValueError("prompts with images given to the SGLang engine of a text-only model (model.vision unset)")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts; give None for text-only ones")
    vision = model.vision
    data = []
    for i, (prompt, x) in enumerate(zip(prompts, images)):
        tokens = [int(t) for t in prompt]
        runs = _runs(tokens, vision.image_token_id)
        counts = image_token_counts(x.image_grid_thw, vision.spatial_merge_size) if x is not None else []
        if [length for _, length in runs] != counts:
            raise ValueError(f"prompt {i} holds image-token runs of {[length for _, length in runs]} tokens for images "
                             f"of {counts} tokens (t*h*w / merge^2 each): build prompts with the model's processor")
        if vision.model_type == "qwen2_5_vl" and any(start == 0 or tokens[start - 1] != vision_start_token_id
                                                     for start, _ in runs):
            raise ValueError(f"prompt {i} has an image without <|vision_start|> (id {vision_start_token_id}) right "
                             "before its tokens: SGLang's Qwen2.5-VL would place it at text positions; render "
                             "prompts with the model's chat template")
        for _ in range(n):  # a list and dict of its own per request (SGLang normalises them in place)
            data.append([] if x is None else [{"format": "processor_output", "pixel_values": x.pixel_values,
                                               "image_grid_thw": x.image_grid_thw}])
    return data


def _runs(tokens: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token` in `tokens`."""
    runs = []
    for i, t in enumerate(tokens):
        if t != token:
            continue
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def parse_generations(outputs: list[dict], n: int, version: int | None, prompt_offset: int = 0,
                      routed_experts: ModelConfig | None = None) -> list[Generation]:
    """SGLang `generate` outputs (one per request, prompt-major) → `Generation`s; with
    `routed_experts` (the engine's MoE model) each one's routed experts as well."""
    generations = []
    for index, out in enumerate(outputs):
        meta = out["meta_info"]
        token_ids = [int(t) for t in out["output_ids"]]
        logprob_entries = meta["output_token_logprobs"]
        if [int(e[1]) for e in logprob_entries] != token_ids:
            raise RuntimeError(f"SGLang returned log-probs for other tokens than it generated (request {index})")
        reason = meta["finish_reason"]
        kind = reason.get("type") if isinstance(reason, dict) else reason
        generations.append(Generation(prompt_offset + index // n, index % n, token_ids,
                                      [float(e[0]) for e in logprob_entries], _FINISH.get(kind, "abort"), version,
                                      _routed_experts(meta, routed_experts, index) if routed_experts else None))
    return generations


def _routed_experts(meta: dict, model: ModelConfig, index: int) -> torch.Tensor:
    """`meta_info["routed_experts"]` (base64 of int32 [tokens, layers, top-k]) as a tensor."""
    import base64

    import numpy as np

    if meta.get("routed_experts") is None:
        raise RuntimeError(f"SGLang returned no routed experts for request {index}: the engine needs "
                           "enable_return_routed_experts=True (rollout.routing_replay sets it)")
    ids = np.frombuffer(base64.b64decode(meta["routed_experts"]), dtype=np.int32)
    return compact_expert_ids(torch.from_numpy(ids.copy()).reshape(-1, model.num_layers, model.moe_router_topk),
                              model.num_experts)
