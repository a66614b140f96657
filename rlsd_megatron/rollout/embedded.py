"""The embedded rollout engine: a Hugging Face `transformers` causal LM in this process (CPU).

The default engine where there is no GPU. It is a real Llama / Qwen2 / Qwen3 / Qwen3-MoE / Qwen2-MoE model built from
our `ModelConfig` (`models.hf_config.hf_config_from_model`, no hub access) that receives the very
same HF-named tensors as SGLang from `rollout.resharding` — written straight into its parameters
when it lives in the learner's process (`writable_weights`), or as buckets — so a CPU run
exercises the whole weight path. Generation batches prompts, prefills each prompt once and repeats its KV cache for
the n samples, decodes with the KV cache and drops finished rows from the batch.

A vision-language `ModelConfig` (`model.vision`) gets transformers' image-text model of its HF
config (`models.vision_config.hf_vision_language_config`: Qwen2.5-VL's
`Qwen2_5_VLForConditionalGeneration`), vision tower included, and prompts come with their images
(`ImageInputs` per prompt), embedded in the prefill. Its M-RoPE positions are ours
(`models.mrope`, the learner's) rather than the model's cached `rope_deltas`, which would go
stale as finished rows leave the batch: a generated token's three positions are one past the
prompt's largest. The image placeholder token is never drawn (a sampled one would have no image
behind it in the learner's forward): like top-k / top-p truncation, this changes what can be
drawn, not the reported log-probs.

Routing replay (`return_routed_experts=True`, an MoE model): while a generate call's sampling
asks for them (`SamplingParams.return_routed_experts`: training draws, not validation or
evaluation), a forward hook on every layer's router (transformers' `Qwen3MoeTopKRouter` /
`Qwen2MoeTopKRouter`, which return the chosen expert ids third) keeps each forward's choices; the
prefill's rows of a prompt are shared by its n samples (their KV cache is
repeated), each decode step adds one row per sample still running, so a sample's
`Generation.routed_experts` covers its prompt and every response token but the last, as SGLang's.

Sampling (per step, in fp32): logits z of the real vocabulary; greedy when temperature = 0;
otherwise p = softmax(z / T), then top-k and top-p truncation (SGLang's rule: a token is dropped
when the mass of the more likely tokens before it already exceeds top_p), renormalised, drawn by
inverse CDF with one uniform per row from that sample's own `torch.Generator` (seeded by
`engine.sample_seed`, so a sample does not depend on what else is in the batch). The reported
log-prob is log_softmax(z / T)[y] before truncation — see `rollout.engine`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Sequence

import torch

from rlsd_megatron.config import ModelConfig
from rlsd_megatron.models.hf_mapping import MappingError
from rlsd_megatron.rollout.engine import (EngineHealth, Generation, RolloutEngine, SamplingParams, compact_expert_ids,
                                          sample_seed)


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """Run with `count` intra-op threads (None: unchanged), restored after; one at a time, since
    the setting is process-wide."""
    if count is None:
        yield
        return
    with _THREADS_LOCK:
        before = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def build_hf_model(model: ModelConfig, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                   **config_extra):
    """A randomly initialised `transformers` causal LM with the architecture of `model`
    (`config_extra` goes into its HF config, e.g. token ids)."""
    import transformers

    from rlsd_megatron.models.hf_config import hf_config_from_model

    config_dict = hf_config_from_model(model, **config_extra)  # a VL model's: its VL config
    auto_model = transformers.AutoModelForCausalLM if model.vision is None else transformers.AutoModelForImageTextToText
    config_cls = type(transformers.AutoConfig.for_model(config_dict["model_type"]))
    config = config_cls(**config_dict)
    hf = auto_model.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return hf.eval()


def checkpoint_views(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`named` (a transformers model's parameters, or tensors keyed like them, e.g. gradients)
    under the names its checkpoints and the weight sync use, as views of the same memory.

    transformers 5 holds a Qwen3-MoE / Qwen2-MoE layer's routed experts fused in 3-D tensors (`mlp.experts.gate_up_proj`
    [E, 2F, H]: per expert [gate; up]; `mlp.experts.down_proj` [E, H, F]); checkpoints, SGLang and
    our mapping name each expert's `gate_proj` / `up_proj` / `down_proj` [F, H] / [F, H] / [H, F] on
    its own. Other names pass through.
    """
    views = {}
    for name, tensor in named.items():
        if name.endswith(".experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for j, fused in enumerate(tensor.unbind(0)):
                gate, up = fused.chunk(2, dim=0)
                views[f"{prefix}{j}.gate_proj.weight"], views[f"{prefix}{j}.up_proj.weight"] = gate, up
        elif name.endswith(".experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            views.update({f"{prefix}{j}.down_proj.weight": down for j, down in enumerate(tensor.unbind(0))})
        else:
            views[name] = tensor
    return views


def sample_tokens(logits: torch.Tensor, sampling: SamplingParams, uniforms: torch.Tensor,
                  banned_token_ids: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampling step. logits [B, V] (any float dtype), uniforms [B] in [0, 1) → (token ids
    [B] int64, log-probs [B] fp32 of those tokens under log_softmax(logits / T)).
    `banned_token_ids` are never drawn (truncated like top-k's tail; reported log-probs unchanged)."""
    z = logits.float()
    banned = list(banned_token_ids)
    if sampling.greedy:
        tokens = z.index_fill(1, torch.tensor(banned, dtype=torch.long), float("-inf")).argmax(-1) if banned \
            else z.argmax(-1)
        return tokens, torch.log_softmax(z, -1).gather(1, tokens[:, None]).squeeze(1)
    log_p = torch.log_softmax(z / sampling.temperature, -1)
    probs = log_p.exp()
    if banned:
        probs = probs.index_fill(1, torch.tensor(banned, dtype=torch.long), 0.0)
    vocab = probs.shape[-1]
    truncate_k = 0 < sampling.top_k < vocab
    if truncate_k or sampling.top_p < 1.0:
        probs, order = probs.sort(-1, descending=True)
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if truncate_k:
            drop[:, sampling.top_k:] = True
        if sampling.top_p < 1.0:
            drop |= (probs.cumsum(-1) - probs) > sampling.top_p
        probs = probs.masked_fill(drop, 0.0)
    else:
        order = None
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).clamp_(max=vocab - 1)
    # Guard against landing on a zero-probability entry through rounding at the top of the cdf.
    picked = torch.where(probs.gather(1, picked) > 0, picked, (probs > 0).cumsum(-1).argmax(-1, keepdim=True))
    tokens = (order.gather(1, picked) if order is not None else picked).squeeze(1)
    return tokens, log_p.gather(1, tokens[:, None]).squeeze(1)


class EmbeddedEngine(RolloutEngine):
    """`RolloutEngine` backed by an in-process `transformers` model (see the module docstring).

    `max_batch_size` bounds the rows (prompts × samples) decoded together; `dtype` is the
    engine's compute dtype (fp32 for parity tests; incoming tensors are cast on copy).
    `num_threads` is the intra-op thread count while generating (None: the process's): one by
    default, because a tiny model's matmuls gain nothing from more, and on a busy host OpenMP's
    spin-waiting threads made a 16×8-sample test 25x slower with two (measured here).
    `return_routed_experts`: record each token's experts (an MoE model; see the module docstring).
    """

    backend = "embedded"

    def __init__(self, model: ModelConfig, *, dtype: torch.dtype = torch.float32, max_batch_size: int = 256,
                 attn_implementation: str = "sdpa", num_threads: int | None = 1, return_routed_experts: bool = False):
        self.model_config = model
        self.num_threads = num_threads
        self.model = build_hf_model(model, dtype=dtype, attn_implementation=attn_implementation)
        self._routing: list[torch.Tensor] | None = None  # the last forward's [tokens, k] per layer
        self._recording = False  # this generate call's sampling asks for the routed experts
        if return_routed_experts:
            if not model.num_experts:
                raise ValueError("return_routed_experts needs an MoE model (model.num_experts)")
            self._routing = []
            for layer in self.model.model.layers:
                layer.mlp.gate.register_forward_hook(self._record_routing)
        self.max_batch_size = max_batch_size
        self.weight_version: int | None = None
        self.asleep = False
        # By checkpoint name (tied lm_head appears once, as embed_tokens; MoE experts one by one).
        self._params = checkpoint_views({name: param.detach() for name, param in self.model.named_parameters()})

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, buckets: Iterable, version: int) -> None:
        """Copy every HF tensor of the stream into the model; every parameter must arrive."""
        received: set[str] = set()
        with torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket.named_tensors():
                    param = self._params.get(name)
                    if param is None:
                        raise MappingError(
                            f"weight sync sent {name!r}, which the embedded {self.model_config.family} model "
                            f"does not have (it has e.g. {sorted(self._params)[:3]})"
                        )
                    if param.shape != tensor.shape:
                        raise MappingError(
                            f"weight sync sent {name!r} with shape {tuple(tensor.shape)}, "
                            f"the embedded model's parameter is {tuple(param.shape)}"
                        )
                    param.copy_(tensor)
                    received.add(name)
                del bucket, tensor  # no view left: the producer may recycle the buffer
        self.weights_written(received, version)

    def writable_weights(self) -> dict[str, torch.Tensor]:
        """Parameters by HF name: in-process, the sync writes into them directly."""
        return dict(self._params)

    def weights_written(self, names: set[str], version: int) -> None:
        missing = sorted(set(self._params) - set(names))
        if missing:
            raise MappingError(f"weight sync (version {version}) left parameters unset: {missing[:5]}"
                               f"{' …' if len(missing) > 5 else ''}; the engine holds mixed weights now")
        self.weight_version = version

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 prompt_offset: int = 0, images: Sequence | None = None) -> list[Generation]:
        if self.asleep:
            raise RuntimeError("the embedded engine is asleep; call wake() before generate()")
        if sampling.return_routed_experts and self._routing is None:
            raise ValueError("sampling asks for routed experts from an engine built without them "
                             "(return_routed_experts=False: rollout.routing_replay is off)")
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(images)} image entries for {len(prompts)} prompts; give None for text-only ones")
        if images is not None and self.model_config.vision is None and any(x is not None for x in images):
            raise ValueError("prompts with images given to the embedded engine of a text-only model (model.vision unset)")
        per_call = max(1, self.max_batch_size // sampling.n)
        out: list[Generation] = []
        self._recording = sampling.return_routed_experts
        try:
            with _torch_threads(self.num_threads):
                for start in range(0, len(prompts), per_call):
                    batch_images = images[start:start + per_call] if images is not None else None
                    out.extend(self._generate_batch(prompts[start:start + per_call], prompt_offset + start, sampling,
                                                    batch_images))
        finally:  # forwards outside generate (and a failed call's leftovers) record nothing
            self._recording = False
            if self._routing is not None:
                self._routing.clear()
        return out

    def _prefill_inputs(self, prompts: Sequence[Sequence[int]], ids: torch.Tensor, mask: torch.Tensor,
                        images: Sequence | None) -> tuple[dict, torch.Tensor]:
        """The prefill's model inputs past ids and mask, and each row's next position [B, 1]:
        text positions over the left-padded rows, or for a VL model M-RoPE's [3, B, S] and the
        batch's images."""
        if self.model_config.vision is None:
            positions = (mask.cumsum(-1) - 1).clamp_(min=0)
            return {"position_ids": positions}, positions[:, -1:] + 1
        from rlsd_megatron.models.mrope import mrope_position_ids

        vision = self.model_config.vision
        images = images if images is not None else [None] * len(prompts)
        width = ids.shape[1]
        positions = torch.zeros(3, len(prompts), width, dtype=torch.long)
        no_images = torch.zeros(0, 3, dtype=torch.long)
        for i, (prompt, x) in enumerate(zip(prompts, images)):
            positions[:, i, width - len(prompt):] = mrope_position_ids(
                ids[i, width - len(prompt):], x.image_grid_thw if x is not None else no_images,
                image_token_id=vision.image_token_id, spatial_merge_size=vision.spatial_merge_size)
        inputs = {"position_ids": positions}
        present = [x for x in images if x is not None]
        if present:
            dtype = next(self.model.parameters()).dtype
            inputs["pixel_values"] = torch.cat([x.pixel_values for x in present]).to(dtype)
            inputs["image_grid_thw"] = torch.cat([x.image_grid_thw for x in present])
        return inputs, positions.amax(dim=(0, 2)).unsqueeze(1) + 1

    def _row_generators(self, first_prompt: int, num_prompts: int, sampling: SamplingParams) -> list[torch.Generator]:
        gens = []
        for i in range(first_prompt, first_prompt + num_prompts):
            for j in range(sampling.n):
                seed = sample_seed(sampling.seed, i, j) if sampling.seed is not None else int(
                    torch.randint(0, 2**62, ()).item())
                gens.append(torch.Generator().manual_seed(seed))
        return gens

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[Sequence[int]], first_prompt: int,
                        sampling: SamplingParams, images: Sequence | None = None) -> list[Generation]:
        n, num_prompts = sampling.n, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(num_prompts, width, dtype=torch.long)
        mask = torch.zeros(num_prompts, width, dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
            ids[i, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        inputs, next_position = self._prefill_inputs(prompts, ids, mask, images)
        result = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **inputs)
        routing = self._take_routing(num_prompts, width)  # [P, width, layers, k], or None
        prompt_routing = [routing[i, width - len(p):] for i, p in enumerate(prompts)] if routing is not None else None
        cache = result.past_key_values
        cache.batch_repeat_interleave(n)
        logits = result.logits[:, -1].repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_position = next_position.repeat_interleave(n, 0)
        vl = self.model_config.vision is not None
        # An image or video token sampled in a response has no image behind it in the learner's forward.
        vision = self.model_config.vision
        banned = [t for t in (vision.image_token_id, vision.video_token_id) if t is not None] if vl else []

        rows = num_prompts * n
        gens = self._row_generators(first_prompt, num_prompts, sampling)
        tokens: list[list[int]] = [[] for _ in range(rows)]
        log_probs: list[list[float]] = [[] for _ in range(rows)]
        finish: list[str] = ["length"] * rows
        stop = set(sampling.stop_token_ids)
        active = list(range(rows))  # batch row -> sample row
        decoded_routing: list[list[torch.Tensor]] = [[] for _ in range(rows)]  # per sample: [layers, k] per token
        generated = torch.zeros(rows, logits.shape[-1], dtype=torch.bool)  # for the presence penalty
        for step in range(sampling.max_new_tokens):
            uniforms = torch.stack([torch.rand((), generator=gens[r]) for r in active])
            if sampling.presence_penalty:
                logits = logits.float() - sampling.presence_penalty * generated[active]
            new, new_lp = sample_tokens(logits, sampling, uniforms, banned)
            keep = []
            for b, r in enumerate(active):
                token = int(new[b])
                generated[r, token] = True
                tokens[r].append(token)
                log_probs[r].append(float(new_lp[b]))
                if token in stop:
                    finish[r] = "stop"
                else:
                    keep.append(b)
            if not keep or step + 1 == sampling.max_new_tokens:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, next_position, new = mask[index], next_position[index], new[index]
                active = [active[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
            position = next_position.unsqueeze(0).expand(3, -1, -1) if vl else next_position  # M-RoPE: all axes
            result = self.model(input_ids=new[:, None], attention_mask=mask, position_ids=position,
                                past_key_values=cache, use_cache=True)
            routing = self._take_routing(len(active), 1)
            if routing is not None:
                for b, r in enumerate(active):
                    decoded_routing[r].append(routing[b, 0])
            cache = result.past_key_values
            logits = result.logits[:, -1]
            next_position = next_position + 1
        routed = [None] * rows
        if prompt_routing is not None:
            routed = [compact_expert_ids(torch.cat([prompt_routing[r // n], *(x[None] for x in decoded_routing[r])]),
                                         self.model_config.num_experts) for r in range(rows)]
        return [
            Generation(first_prompt + r // n, r % n, tokens[r], log_probs[r], finish[r], self.weight_version, routed[r])
            for r in range(rows)
        ]

    def _record_routing(self, module, args, output) -> None:
        if self._recording:
            self._routing.append(output[2])

    def _take_routing(self, batch: int, width: int) -> torch.Tensor | None:
        """The last forward's recorded experts as [batch, width, layers, k] (None when not recording)."""
        if not self._recording:
            return None
        per_layer, self._routing[:] = list(self._routing), []
        return torch.stack(per_layer, dim=1).reshape(batch, width, len(per_layer), -1)

    # -- lifecycle -------------------------------------------------------------------------
    def sleep(self) -> None:
        self.asleep = True

    def wake(self, tags: Sequence[str] | None = None) -> None:
        self.asleep = False

    def health(self) -> EngineHealth:
        return EngineHealth(self.backend, ok=self.model is not None, weight_version=self.weight_version,
                            asleep=self.asleep, detail={"family": self.model_config.family})

    def shutdown(self) -> None:
        self.model = None
        self._params = {}
