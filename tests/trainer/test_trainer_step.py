"""One full RL step through the real stack (Megatron learner, embedded engine, resharding,
rewards) at TP=2 and PP=2 over gloo, for the rlsd, grpo, opsd and sdpo presets and SDPO with
sampled-token distillation, each asserting its method's signal; tensorboard scalars of a short run."""

from __future__ import annotations

import torch

METHOD_OVERRIDES = {
    "rlsd": ["algorithm.method=rlsd", "algorithm.teacher_weights=frozen_sync"],
    "grpo": ["algorithm.method=grpo"],
    "opsd": ["algorithm.method=opsd", "algorithm.teacher_weights=frozen", "algorithm.distill_loss=jsd"],
    "sdpo": ["algorithm.method=sdpo", "algorithm.teacher_weights=ema", "algorithm.distill_loss=topk",
             "algorithm.distill_topk=8", "algorithm.distill_support=student", "algorithm.sdpo_success_threshold=0.3"],
    "sdpo_sampled": ["algorithm.method=sdpo", "algorithm.teacher_weights=ema", "algorithm.distill_loss=sampled",
                     "algorithm.sdpo_success_threshold=0.3"],
}
TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
    "warm_start.max_steps=0", "train.prompts_per_step=4", "rollout.n=4", "train.micro_batch_size=4",
    "reward.custom_fn=tests.trainer.reward_fns:digit_fraction", "optimizer.lr=1e-3", "train.eval_interval=100",
]


def one_step(method: str, tp: int, pp: int, log_dir: str) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [*TINY, *METHOD_OVERRIDES[method], f"parallel.tp={tp}",
                                                          f"parallel.pp={pp}", f"logging.dir={log_dir}"])
    with model_parallel(tp=tp, pp=pp, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        trainer.sync_weights()
        before = trainer.learner.full_state()
        trainer.step = 1
        engine_asleep_in_update = []
        update = trainer.update

        def update_noting_the_engine(*args, **kwargs):
            if trainer.engine is not None:
                engine_asleep_in_update.append(trainer.engine.health().asleep)
            return update(*args, **kwargs)

        trainer.update = update_noting_the_engine
        metrics = trainer.train_step()
        after = trainer.learner.full_state()
        awake_after = trainer.engine.health().asleep is False if trainer.engine is not None else None
        trainer.close()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    return {"metrics": metrics, "changed": changed, "total": len(before),
            "engine": (engine_asleep_in_update, awake_after)}


def all_steps(log_dir: str) -> dict:
    return {(method, tp, pp): one_step(method, tp, pp, f"{log_dir}/{method}-{tp}-{pp}")
            for method in METHOD_OVERRIDES for tp, pp in ((2, 1), (1, 2))}


def test_one_step_per_method_at_tp2_and_pp2(dist_pool, tmp_path):
    results = dist_pool(2).run(all_steps, str(tmp_path), timeout=900)
    for (method, tp, pp), result in results[0].items():  # rank 0 hosts the engine
        # Colocated: asleep for the learner's update, awake again after the weight sync.
        assert result["engine"] == ([True], True), (method, tp, pp, result["engine"])
    last_rank = results[-1]  # the rank that holds the loss (last pipeline stage)
    for (method, tp, pp), result in last_rank.items():
        where = f"{method} tp={tp} pp={pp}"
        m = result["metrics"]
        assert result["changed"] == result["total"], f"{where}: only {result['changed']}/{result['total']} tensors changed"
        assert m["train/grad_norm"] > 0, where
        assert m["rollout/logprob_mismatch_mean"] < 1e-5, where  # engine and learner agree after the sync
        assert m["weight_sync/gb"] > 0 and m["weight_sync/seconds"] > 0, where  # the host's figures, logged here
        if method in ("rlsd", "grpo"):
            # Step 1: the recomputed log-probs equal the old ones, so every ratio is exactly 1.
            assert m["train/approx_kl"] == 0.0 and m["train/ratio_max"] == 1.0 and m["train/ratio_min"] == 1.0, where
        if method == "rlsd":
            assert 0 < m["rlsd/lambda"] < 0.5
            # The hinted teacher scores the rollouts unlike the student (Δ ≠ 0), and with λ > 0 the
            # token advantages move off GRPO's A (RLSD does not silently run as GRPO).
            assert m["rlsd/delta_abs_mean"] > 1e-3, (where, m["rlsd/delta_abs_mean"])
            assert m["rlsd/reweight_abs_dev"] > 1e-4, (where, m["rlsd/reweight_abs_dev"])
        if method in ("opsd", "sdpo"):
            assert m["train/distill"] > 0, where
        if method == "sdpo_sampled":
            # A policy-gradient term from the teacher's log-probs of the sampled tokens, no loss on logits.
            assert "train/distill" not in m, where
            assert m["distill/sampled_abs_log_ratio"] > 1e-3, (where, m["distill/sampled_abs_log_ratio"])


def interleaved_and_plain_steps(method: str, log_dir: str) -> dict:
    """One step at PP=4 and at PP=4 x VPP=2 (8 layers) from the same weights: learner weights after
    the update, the step's metrics, and (on the engine's rank) the weights the engine got."""
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    overrides = [o for o in TINY if not o.startswith(("model.num_layers", "train.micro_batch_size"))]
    # 8 micro-batches of 2 sequences, two groups of pp for the interleaved schedule; the same
    # micro-batches in both layouts, so that sums run in the same order.
    overrides += ["model.num_layers=8", "train.micro_batch_size=2", *METHOD_OVERRIDES[method],
                  "parallel.pp=4", f"logging.dir={log_dir}"]
    results, weights = {}, None
    for vpp in (None, 2):
        cfg = load_config("examples/configs/cpu_demo.yaml", [*overrides, f"parallel.vpp={vpp or 'null'}"])
        with model_parallel(pp=4, vpp=vpp, seed=cfg.train.seed):
            trainer = Trainer(cfg)
            if weights is not None:  # layouts draw their initial weights differently (seed per stage)
                trainer.learner.load_full_state(weights)
                trainer.teacher.initialize(trainer.learner.local_weights())
            weights = weights or trainer.learner.full_state()
            trainer.sync_weights()
            trainer.step = 1
            metrics = trainer.train_step()
            engine = {n: t.clone() for n, t in trainer.engine.writable_weights().items()} if trainer.engine else None
            results[vpp] = {"metrics": {k: v for k, v in metrics.items() if not k.startswith(("perf/", "weight_sync/"))},
                            "after": trainer.learner.full_state(), "engine": engine}
            trainer.close()
    return results


def test_interleaved_pipeline_step_equals_the_plain_pipeline(dist_pool, tmp_path):
    """RLSD (the teacher's log-probs in the score phase) and OPSD (the teacher's logits in the
    update's chunks of micro-batches) under the interleaved schedule: bit for bit the PP=4 step."""
    for method in ("rlsd", "opsd"):
        ranks = dist_pool(4).run(interleaved_and_plain_steps, method, str(tmp_path / method), timeout=900)
        plain, interleaved = ranks[-1][None], ranks[-1][2]
        assert plain["metrics"] == interleaved["metrics"], method
        assert plain["metrics"]["train/grad_norm"] > 0, method
        for name, tensor in plain["after"].items():
            assert torch.equal(tensor, interleaved["after"][name]), (method, name)
        engine_plain, engine_interleaved = ranks[0][None]["engine"], ranks[0][2]["engine"]
        assert engine_plain.keys() == engine_interleaved.keys() and engine_plain
        for name, tensor in engine_plain.items():
            assert torch.equal(tensor, engine_interleaved[name]), (method, name)
