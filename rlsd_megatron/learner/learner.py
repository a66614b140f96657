"""The learner: megatron-core GPT chunks under DDP with Megatron's optimizer and schedules.

`Learner.train_step(micro_batches, loss_fn)` runs forward/backward through
`get_forward_backward_func` (any PP / VPP schedule), reduces gradients over data (and context)
parallel ranks with Megatron's `DistributedDataParallel`, clips, steps the optimizer and the LR
schedule; `Learner.train_step_in_chunks` does the same over micro-batches built chunk by chunk
(a teacher's forward between them), reducing once. Forward-only passes (`forward`,
`forward_sequences`) and micro-batching come from `ModelRunner` (learner/runner.py), which frozen
scoring models share.

Logits handed to the callbacks are vocabulary-parallel ([B, S, V/TP] on each TP rank) and
never gathered. Loss normalisation belongs to the caller: gradients are *summed* over
micro-batches and data-parallel ranks (Megatron's per-token-loss mode with the final division
by a token count switched off), so a loss of `sum(per_token) / global_token_count` yields
exactly the full-batch token-mean gradient however the batch is split.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from rlsd_megatron.config import Config
from rlsd_megatron.dtypes import torch_dtype
from rlsd_megatron.learner.batch import MicroBatch
from rlsd_megatron.learner.runner import ModelRunner, PerTokenFn, place_model_chunks
from rlsd_megatron.models.provider import build_model_chunks

__all__ = ["LossFn", "Learner", "PerTokenFn"]

LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _finalize_grads_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's finalize (DP/CP reduce, tied-embedding and layer-norm sync) minus the division
    by the token count: our losses arrive globally normalised."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads(model, None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


class Learner(ModelRunner):
    """A trainable policy model on this rank, with its optimizer and LR schedule."""

    def __init__(self, cfg: Config, *, impl: str = "local"):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        chunks = place_model_chunks(build_model_chunks(cfg, impl=impl), cfg)
        dtype = torch_dtype(cfg.precision.params_dtype)
        config = chunks[0].config
        distributed = cfg.parallel.use_distributed_optimizer and parallel_state.get_data_parallel_world_size(
            with_context_parallel=True
        ) > 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
            use_distributed_optimizer=distributed,
        )
        model = [
            DistributedDataParallel(
                config=config,
                ddp_config=ddp_config,
                module=chunk,
                # Bucket 0 of the first chunk: Megatron's convention for overlapping param gather.
                disable_bucketing=index > 0,
            )
            for index, chunk in enumerate(chunks)
        ]
        super().__init__(cfg, model, impl=impl)
        self.config.no_sync_func = [m.no_sync for m in self.model]
        if len(self.model) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        self.config.finalize_model_grads_func = _finalize_grads_without_token_scaling
        if cfg.model.num_experts and cfg.model.moe_aux_loss_coeff > 0:
            from rlsd_megatron.learner.moe_aux_loss import LoadBalancingLoss

            self.load_balancing = LoadBalancingLoss(chunks, cfg.model.moe_aux_loss_coeff,
                                                    cfg.parallel.sequence_parallel)
        if cfg.rollout.routing_replay:
            from rlsd_megatron.learner.routing_replay import RoutingReplay

            # By the DDP-wrapped chunks: those are what the schedule hands the forward step.
            self.routing_replay = RoutingReplay(model, sequence_parallel=cfg.parallel.sequence_parallel)

        opt = cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=opt.lr,
                min_lr=opt.min_lr,
                weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1,
                adam_beta2=opt.adam_beta2,
                adam_eps=opt.adam_eps,
                clip_grad=opt.clip_grad,
                bf16=dtype is torch.bfloat16,
                params_dtype=dtype,
                use_distributed_optimizer=distributed,
            ),
            self.model,
        )
        decay_steps = opt.lr_decay_steps or cfg.train.steps
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if opt.lr_warmup_steps else opt.lr,
            max_lr=opt.lr,
            min_lr=opt.min_lr,
            lr_warmup_steps=opt.lr_warmup_steps,
            lr_decay_steps=max(decay_steps, opt.lr_warmup_steps + 1),
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=max(decay_steps, 1),
            wd_incr_style="constant",
        )

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over `micro_batches`; returns grad norm, lr, and, on the last
        stage, `loss` summed over micro-batches (this rank's share of a globally normalised
        loss) and each metric `loss_fn` reported, averaged over micro-batches."""
        return self.train_step_in_chunks([lambda: micro_batches], loss_fn)

    def train_step_in_chunks(self, chunks: Sequence[Callable[[], list[MicroBatch]]], loss_fn: LossFn
                             ) -> dict[str, float]:
        """One optimizer step over micro-batches that arrive in chunks: `chunks[i]()` builds chunk
        i's micro-batches right before their forward/backward, after chunk i-1's backward, so it
        may run forward passes of its own (a teacher's) whose outputs live for that chunk only.
        Gradients accumulate over all chunks and are reduced over data (and context) parallel
        ranks once, in the last chunk's schedule; returns what `train_step` returns, over the
        micro-batches of every chunk."""
        def loss_with_count(mb: MicroBatch, logits: torch.Tensor):
            loss, metrics = loss_fn(logits, mb)
            reported = {"loss": loss.detach(), **{k: torch.as_tensor(v).detach().float() for k, v in metrics.items()}}
            return loss, torch.zeros((), dtype=torch.int), reported

        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs: list[dict] = []
        if self.load_balancing is not None:
            self.load_balancing.reset()
        for index, make_chunk in enumerate(chunks):
            micro_batches = make_chunk()
            # The load-balancing loss: the mean over the step's micro-batches (exact when the chunks
            # are equally long) on every data-parallel rank (`learner.moe_aux_loss`).
            self.load_balancing_weight = 1.0 / (len(micro_batches) * len(chunks) * self._data_parallel_size())
            for m in self.model:
                m.train()  # a chunk's own forward passes leave the model in eval mode
            last = index == len(chunks) - 1
            with contextlib.nullcontext() if last else self._accumulate_gradients_only():
                outputs += self._run(micro_batches, loss_with_count, forward_only=False)
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        stats = {
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "update_skipped": float(not update_ok),
        }
        if outputs:
            for key in outputs[0]:
                values = torch.stack([o[key].float() for o in outputs])
                stats[key] = float(values.sum() if key == "loss" else values.mean())
        if self.load_balancing is not None:
            values = self.load_balancing.values()
            stats["moe_aux_loss"] = sum(values) / max(len(values), 1)  # transformers' aux, without the coefficient
        return stats

    @staticmethod
    def _data_parallel_size() -> int:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_world_size()

    @contextlib.contextmanager
    def _accumulate_gradients_only(self):
        """Schedules inside this block only add into the gradient buffers. Megatron's schedules
        leave `no_sync` for a run's last micro-batch (under `overlap_grad_reduce` its backward
        hooks start the bucket reductions) and end with `finalize_model_grads` (the DP/CP
        reduction); either would reduce a partial sum that later chunks add to. So the DDP
        chunks stay in `no_sync` for the whole block and the schedule gets neither hook."""
        config = self.config
        saved = config.no_sync_func, config.finalize_model_grads_func
        config.no_sync_func, config.finalize_model_grads_func = None, None
        try:
            with contextlib.ExitStack() as stack:
                for m in self.model:
                    stack.enter_context(m.no_sync())
                yield
        finally:
            config.no_sync_func, config.finalize_model_grads_func = saved

    def load_full_state(self, full_state: dict[str, torch.Tensor]) -> None:
        """Load canonical (TP=1, PP=1, unpadded) Megatron tensors into this rank's shards; the
        optimizer's fp32 main weights follow."""
        super().load_full_state(full_state)
        self.optimizer.reload_model_params()

    def init_optimizer_state(self, step: int | None = None) -> None:
        """Give every parameter of a torch-Adam optimizer its state (zero moments, step 0),
        or set the per-parameter step count to `step` (after loading a checkpoint).

        megatron-core assumes a fused Adam (apex / Transformer Engine) that keeps the step count
        in the parameter groups; with the torch AdamW fallback (CPU) a fresh optimizer has no
        per-parameter `step` (the distributed optimizer's `state_dict` then asserts) and loading
        a checkpoint leaves it at 0. No-op for fused optimizers.
        """
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for wrapper in optimizers:
            inner = wrapper.optimizer
            if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
                continue
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state[param]
                    state.setdefault("exp_avg", torch.zeros_like(param))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param))
                    if step is not None or "step" not in state:
                        state["step"] = torch.tensor(float(step or 0), dtype=torch.float32)
