"""The rollout-engine interface: what the trainer asks of SGLang and of the embedded CPU engine.

An engine generates token ids from prompt token ids (no text crosses this boundary) and
returns, for every sampled token, the log-probability the engine itself computed. Both
backends report the same quantity, which is also what the learner computes with
`ops.token_log_probs(logits, ids, temperature=T)`:

    log_softmax(z / T)[y]   over the real vocabulary (no padded rows),

the temperature-scaled distribution *before* top-k / top-p truncation (what SGLang 0.5.23's
sampler returns by default, `layers/sampler.py`); with `temperature=0` (greedy) it is the
untempered `log_softmax(z)[y]`, as in SGLang. Truncation changes which tokens can be drawn, not
the reported log-probs, so learner and engine log-probs of the same sampled token agree up to
numerics — the mismatch monitor (`rollout.mismatch`) watches exactly that.

Weights arrive through `update_weights(buckets, version)` as HF-named tensors produced by
`rollout.resharding`, one bounded `FlatBucket` at a time — or, for an engine living in the
learner's process, written straight into its parameters (`writable_weights`).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Literal, Sequence

if TYPE_CHECKING:
    import torch

    from rlsd_megatron.rollout.buckets import FlatBucket
    from rlsd_megatron.rollout.fp8 import Fp8BlockConfig

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `top_k <= 0` and `top_p = 1` switch truncation off; `temperature = 0` is
    greedy. `stop_token_ids` end a sample and are included in its tokens (they were sampled, carry
    a log-prob, and the learner trains on them). `seed` makes generation reproducible: sample j of
    prompt i uses `sample_seed(seed, i, j)`, so results do not depend on batching.
    `presence_penalty` is subtracted from the logits of every token this sample has already
    generated (not the prompt's), before temperature, as in SGLang; the reported log-probs are then
    of the penalised distribution (SGLang's too), which the learner does not reproduce — the
    recipe uses it for validation only."""

    n: int = 1  # samples per prompt (G in GRPO)
    temperature: float = 1.0  # recipe 1.0 for training, 0.7 for validation
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    # Return each token's routed experts (`Generation.routed_experts`; routing replay's training
    # draws): only an engine built to record them can, and validation and evaluation never ask.
    return_routed_experts: bool = False

    def __post_init__(self):
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} (need >= 1)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (need >= 0; 0 is greedy)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (need 0 < top_p <= 1)")
        if not -2 <= self.presence_penalty <= 2:
            problems.append(f"presence_penalty={self.presence_penalty} (need -2 <= presence_penalty <= 2)")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} (need >= 1)")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def compact_expert_ids(ids: "torch.Tensor", num_experts: int) -> "torch.Tensor":
    """Expert ids in the narrowest integer type that holds them (uint8 up to 256 experts, else
    int16): the rollouts keep [tokens, layers, top-k] of them per sequence (Qwen3-30B-A3B: 48 x 8)."""
    import torch

    return ids.to(torch.uint8 if num_experts <= 256 else torch.int16)


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one sample, a fixed function of (seed, prompt, sample)."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Generation:
    """One sampled continuation. `log_probs[t]` is the engine's log-prob of `token_ids[t]` (see
    the module docstring for the distribution)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    log_probs: list[float]
    finish_reason: FinishReason
    weight_version: int | None = None
    # [prompt + response - 1, layers, top-k] the experts an MoE engine routed each token it ran to
    # (every token but the last sampled one, which it never ran), in layer order; engines record them
    # when built with return_routed_experts (rollout.routing_replay), None otherwise.
    routed_experts: "torch.Tensor | None" = None


@dataclass
class EngineHealth:
    """What `health()` reports."""

    backend: str
    ok: bool
    weight_version: int | None
    asleep: bool
    detail: dict[str, Any] = field(default_factory=dict)


class RolloutEngine(abc.ABC):
    """A generation engine the trainer drives between learner phases.

    `generate` returns `len(prompts) * sampling.n` generations, prompt-major (all samples of
    prompt 0, then of prompt 1, ...), each holding the new token ids (no prompt).
    `update_weights` consumes a stream of buckets of HF-named tensors and must drop each bucket
    (`del bucket`, and any view of it) once the engine holds its data, before asking for the next
    one, so the producer's extra memory stays at one bucket; it raises if a name or shape does not
    match the engine's model. `sleep` releases the engine's accelerator memory (weights and KV
    cache) for the learner's phase; `wake` takes it back (`tags` selects parts, e.g. weights
    before a sync and the KV cache after it, to lower the peak).
    """

    backend: str = "abstract"
    # The FP8 block format of the engine's projection weights, which every push must have (the
    # resharding stream quantises to it, `rollout.fp8`); None: pushed as the learner holds them.
    fp8_format: "Fp8BlockConfig | None" = None

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams, *,
                 prompt_offset: int = 0, images: Sequence[Any] | None = None) -> list[Generation]:
        """`prompt_offset` is the index of `prompts[0]` in the whole rollout batch: it numbers the
        results and picks the seeds, so a batch split over engines samples what one engine would.
        `images[i]` are prompt i's images (`ImageInputs`, None for text) for a vision-language
        model, whose prompts hold one image token per image embedding."""

    @abc.abstractmethod
    def update_weights(self, buckets: Iterable["FlatBucket"], version: int) -> None:
        ...

    def writable_weights(self) -> dict[str, "torch.Tensor"] | None:
        """An in-process engine's parameters by HF name, which `sync_weights` then writes into
        directly (one copy, no bucket) before calling `weights_written`; None (the default): the
        weights arrive through `update_weights`."""
        return None

    def weights_written(self, names: set[str], version: int) -> None:
        """After a direct write of `names` into `writable_weights()`: check that every parameter
        arrived and take `version`."""
        raise NotImplementedError(f"{type(self).__name__} takes weights through update_weights()")

    def last_batch_metrics(self) -> dict[str, float]:
        """`perf/` figures of the last batch generated (an engine on other ranks reports its time
        and the time each side waited for the other); {} where there are none."""
        return {}

    def sleep(self) -> None:
        """Release accelerator memory (no-op where there is none to release)."""

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Take the memory released by `sleep` back (all of it when `tags` is None)."""

    def flush_cache(self) -> None:
        """Drop cached prefixes (KV cache) computed with older weights."""

    @abc.abstractmethod
    def health(self) -> EngineHealth:
        ...

    def shutdown(self) -> None:
        """Stop the engine and free everything it holds."""
