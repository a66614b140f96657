"""One RL step with a mixture-of-experts policy (issue 21) per method family — RLSD, GRPO, OPSD —
through the real stack at EP=2 over gloo (two ranks: experts split over them, dense layers data
parallel), a tiny Qwen3-MoE (4 experts of width 16, top-2) with transformers' load-balancing loss
and routing replay on (`rollout.routing_replay`), one pool launch.

The signal, per method: every tensor changes, every expert's included (each rank updates its own
experts); `train/moe_aux_loss` is reported (2.0 is a perfectly balanced top-2, far from 0);
RLSD's hinted teacher differs from the student (|Δ| > 1e-3); OPSD's distillation loss is positive.
Routing replay end to end, engine → rollouts → micro-batches → routers: for RLSD and OPSD the
engine holds the learner's weights, so the recorded experts are the ones the learner would choose
and `rollout/routing_replay_changed_frac` is ~0 (a record misplaced by one token, layer or rank
would change about half of them) and the log-probs agree within 1e-5; for GRPO the engine's router
weights are perturbed after the sync, so it routes > 10% of the (token, layer) routes elsewhere,
and the ratio is still exactly 1 at step 1: the old log-probs and the update replayed the same
experts.
"""

from __future__ import annotations

import torch

from tests.trainer.test_trainer_step import METHOD_OVERRIDES

METHODS = ("rlsd", "grpo", "opsd")
MOE = [
    "model.family=qwen3_moe", "model.qk_layernorm=true", "model.num_experts=4", "model.moe_router_topk=2",
    "model.moe_ffn_hidden_size=16", "model.moe_aux_loss_coeff=0.01", "model.hidden_size=32", "model.num_layers=2",
    "model.num_attention_heads=4", "model.ffn_hidden_size=64", "parallel.ep=2", "rollout.routing_replay=true",
    "warm_start.max_steps=0", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=4",
    "reward.custom_fn=tests.trainer.reward_fns:digit_fraction", "optimizer.lr=1e-3", "train.eval_interval=100",
]


def one_step(method: str, log_dir: str, perturb_engine_router: bool) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [*MOE, *METHOD_OVERRIDES[method], f"logging.dir={log_dir}"])
    with model_parallel(ep=2, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        trainer.sync_weights()
        if perturb_engine_router:  # every rank hosts its replica's engine (tp = pp = 1)
            generator = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for layer in trainer.engine.model.model.layers:
                    gate = layer.mlp.gate.weight
                    gate.add_(torch.randn(gate.shape, generator=generator) * gate.abs().mean() * 3)
        before = trainer.learner.full_state()
        trainer.step = 1
        metrics = trainer.train_step()
        after = trainer.learner.full_state()
        trainer.close()
    unchanged = sorted(k for k in before if torch.equal(before[k], after[k]))
    return {"metrics": metrics, "unchanged": unchanged, "experts": sum(".experts." in k for k in before)}


def all_steps(log_dir: str) -> dict:
    return {method: one_step(method, f"{log_dir}/{method}", perturb_engine_router=method == "grpo")
            for method in METHODS}


def test_one_moe_step_per_method_family_at_ep2(dist_pool, tmp_path):
    results = dist_pool(2).run(all_steps, str(tmp_path), timeout=900)[-1]
    for method, result in results.items():
        m = result["metrics"]
        assert result["experts"] == 2 * 4 * 2 and result["unchanged"] == [], (method, result["unchanged"][:5])
        assert m["train/grad_norm"] > 0, method
        assert 1.5 < m["train/moe_aux_loss"] < 4.0, (method, m["train/moe_aux_loss"])
        changed = m["rollout/routing_replay_changed_frac"]
        if method == "grpo":
            assert changed > 0.1, changed
            assert m["train/approx_kl"] == 0.0 and m["train/ratio_max"] == 1.0 and m["train/ratio_min"] == 1.0
        else:
            assert changed < 0.01, (method, changed)
            assert m["rollout/logprob_mismatch_mean"] < 1e-5, (method, m["rollout/logprob_mismatch_mean"])
        if method == "rlsd":
            assert m["rlsd/delta_abs_mean"] > 1e-3, m["rlsd/delta_abs_mean"]
        if method == "opsd":
            assert m["train/distill"] > 0, m["train/distill"]
