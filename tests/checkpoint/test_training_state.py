"""Training-state checkpoints (`trainer.training_state.save_training_state` / resume) with bf16 params, on
a 2-rank gloo pool: TP=2 (data parallel 1: Megatron's non-distributed
`Float16OptimizerWithFloat16Params`) and TP=1 (data parallel 2: the distributed optimizer).

A trainer takes one RL step and saves; a second trainer resumes from that checkpoint. Weights,
fp32 main params and Adam state must come back bit for bit, and the next step of both must be
identical (metrics and weights).
"""

from __future__ import annotations

import pytest
import torch

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
    "warm_start.max_steps=0", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=8",
    "reward.custom_fn=tests.trainer.reward_fns:digit_fraction", "optimizer.lr=1e-3", "train.steps=2",
    "train.eval_interval=100", "precision.params_dtype=bf16",
]


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """This rank's weights, the optimizer's main params and Adam state, by a stable name."""
    learner = trainer.learner
    state = {f"weight.{name}": param.detach().clone() for name, param in learner.named_parameters()}
    for index, wrapper in enumerate(getattr(learner.optimizer, "chained_optimizers", [learner.optimizer])):
        inner = wrapper.optimizer
        params = [param for group in inner.param_groups for param in group["params"]]
        for number, param in enumerate(params):
            state[f"optim{index}.{number}.main_param"] = param.detach().clone()
            for key, value in inner.state[param].items():
                state[f"optim{index}.{number}.{key}"] = torch.as_tensor(value).clone()
    return state


def _differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    if sorted(a) != sorted(b):
        return [f"keys differ: {sorted(set(a) ^ set(b))[:6]}"]
    return [name for name in a if a[name].dtype != b[name].dtype or not torch.equal(a[name], b[name])]


def _step_metrics(trainer) -> dict[str, float]:
    """One step's metrics without the timings."""
    return {k: v for k, v in trainer.train_step().items() if not k.startswith("perf/") and "seconds" not in k
            and not k.endswith("_per_s")}


def save_then_resume(root: str, tp: int) -> dict:
    import dataclasses

    from megatron.core import parallel_state

    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.training_state import save_training_state
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [*TINY, f"parallel.tp={tp}", f"checkpoint.dir={root}",
                                                          f"logging.dir={root}/logs"])
    with model_parallel(tp=tp, seed=cfg.train.seed):
        a = Trainer(cfg)
        a.sync_weights()
        a.step = 1
        a.train_step()
        save_training_state(a, root)  # raised "Param id N does not match any model sharded param"
        saved = _snapshot(a)
        a.step = 2
        metrics_a = _step_metrics(a)
        after_a = _snapshot(a)
        a.close()

        b = Trainer(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto")))
        resumed_step, resumed = b.step, _snapshot(b)
        b.sync_weights()
        b.step = 2
        metrics_b = _step_metrics(b)
        after_b = _snapshot(b)
        b.close()
        return {
            "dp": parallel_state.get_data_parallel_world_size(),
            "dtypes": sorted({str(p.dtype) for _, p in b.learner.named_parameters()}),
            "resumed_step": resumed_step,
            "resume_differs": _differences(saved, resumed),
            "optimizer_entries": sum(name.startswith("optim") for name in saved),
            "metrics": (metrics_a, metrics_b),
            "next_step_differs": _differences(after_a, after_b),
        }


@pytest.mark.parametrize("tp, dp", [(2, 1), (1, 2)], ids=["tp2-dp1-float16-optimizer", "tp1-dp2-distributed-optimizer"])
def test_bf16_training_state_resumes_exactly(dist_pool, tmp_path, tp, dp):
    per_rank = dist_pool(2).run(save_then_resume, str(tmp_path), tp, timeout=600)
    for rank, result in enumerate(per_rank):
        assert result["dp"] == dp
        assert result["dtypes"] == ["torch.bfloat16"], result["dtypes"]  # as Megatron-LM's Float16Module casts
        assert result["resumed_step"] == 1
        assert result["optimizer_entries"] > 0
        assert result["resume_differs"] == [], (rank, result["resume_differs"][:6])
        metrics_a, metrics_b = result["metrics"]
        assert metrics_a == metrics_b, rank
        assert result["next_step_differs"] == [], (rank, result["next_step_differs"][:6])
