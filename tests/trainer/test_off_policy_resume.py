"""Exact resume of one-step-off-policy training (`train.off_policy_steps=1`) with the engine on its
own rank (`rollout.placement=separate`), through both stops a SLURM job makes: one 3-process
launch, ranks 0-1 train (tp=2: the replica's host and a rank that gets the host's rollouts), rank 2
serves the engine and, like every process of a SLURM step, gets the stop signal too.

A trains 4 steps uninterrupted. B is stopped by SIGUSR1 (sent to all three processes) after step
2: its checkpoint must hold step 3's batch, generated with step 1's weights while step 2 trained
and still in flight then. C resumes and is stopped during step 4's generation (a signal on the
replica's second rank): the step is rewound and its batch, drawn in step 3, goes into step 3's
checkpoint. D resumes and runs step 4. Every step's metrics of B, C, D and the final weights of
the learner and of the engine must equal A's bit for bit.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from tests.trainer.test_resume import TINY


def _config(tmp: str, name: str, checkpoints: str, *, resume: bool):
    from rlsd_megatron.config import load_config

    return load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "rollout.placement=separate", "rollout.engine_ranks=1", "parallel.tp=2", "train.off_policy_steps=1",
        "checkpoint.save_interval=0", "train.eval_interval=0", "logging.progress_bar=false",
        f"logging.dir={tmp}/logs/{name}", f"checkpoint.dir={tmp}/{checkpoints}",
        *(["checkpoint.resume=auto"] if resume else [])])


def run(tmp: str, name: str, checkpoints: str, *, resume: bool = False, signal_after_step: int | None = None,
        signal_at_generation: int | None = None) -> dict:
    """One `Trainer.run()` (the engine rank: `serve_engine` until the learner stops it). After step
    `signal_after_step` rank 0 sends SIGUSR1 to every process, as srun forwards the time-limit warning;
    right after step `signal_at_generation`'s generation rank 1 signals itself."""
    import torch.distributed as dist

    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel, weight_broadcast_group
    from rlsd_megatron.rollout.provider import create_engine
    from rlsd_megatron.rollout.separate import serve_engine
    from rlsd_megatron.trainer.stopping import StopController
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = _config(tmp, name, checkpoints, resume=resume)
    pids = [None] * dist.get_world_size()
    with model_parallel(tp=2, seed=cfg.train.seed, engine_ranks=1):
        if is_engine_rank():
            stop = StopController()
            stop.install()  # rlsd-train installs it on every rank, the engine's too
            dist.all_gather_object(pids, os.getpid())
            engine = create_engine(cfg)
            try:
                served = serve_engine(engine, weight_broadcast_group())
            finally:
                stop.restore()
            return {"served": served, "version": engine.health().weight_version, "signal": stop.signal_received,
                    "weights": {n: t.clone() for n, t in engine.writable_weights().items()}}
        trainer = Trainer(cfg)
        dist.all_gather_object(pids, os.getpid())
        logged, train_step, collect = {}, trainer.train_step, trainer.collect_rollouts
        log = trainer.logger.log
        trainer.logger.log = lambda step, metrics: logged.__setitem__(step, dict(metrics)) or log(step, metrics)

        def step_then_signal():
            metrics = train_step()
            if trainer.step == signal_after_step and dist.get_rank() == 0:
                for pid in pids:
                    os.kill(pid, signal.SIGUSR1)
            return metrics

        def collect_then_signal():
            rollouts = collect()
            if trainer.step == signal_at_generation and dist.get_rank() == 1:
                signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
            return rollouts

        trainer.train_step, trainer.collect_rollouts = step_then_signal, collect_then_signal
        resumed_at = trainer.step
        trainer.run()
        return {"resumed_at": resumed_at, "step": trainer.step, "logged": logged,
                "weights": {n: t.clone() for n, t in trainer.learner.full_state().items()}}


def runs(tmp: str) -> dict:
    return {"a": run(tmp, "a", "ckpt-a"),
            "b": run(tmp, "b", "ckpt", signal_after_step=2),
            "c": run(tmp, "c", "ckpt", resume=True, signal_at_generation=4),
            "d": run(tmp, "d", "ckpt", resume=True)}


def _untimed(metrics: dict) -> dict:
    """All but the clock's readings (perf/*, the weight sync's time and rate)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith("perf/") and k not in ("weight_sync/seconds", "weight_sync/gb_per_s")}


def _latest(tmp_path) -> str:
    return (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip()


def test_off_policy_with_separate_engines_resumes_exactly_after_both_stops(dist_pool, tmp_path):
    ranks = dist_pool(3).run(runs, str(tmp_path), timeout=1200)
    learner, engine = ranks[1], ranks[2]  # rank 1 logs
    assert [(learner[r]["resumed_at"], learner[r]["step"]) for r in "abcd"] == [(0, 4), (0, 2), (2, 3), (3, 4)]
    assert [sorted(learner[r]["logged"]) for r in "abcd"] == [[1, 2, 3, 4], [1, 2], [3], [4]]
    assert _latest(tmp_path) == "4"
    # The engine rank kept serving through the SIGUSR1 it got with the others (its handler only notes it).
    assert engine["b"]["signal"] == signal.SIGUSR1 and engine["b"]["version"] == 2

    reference = learner["a"]["logged"]
    for r in "bcd":
        for step, metrics in learner[r]["logged"].items():
            want, got = _untimed(reference[step]), _untimed(metrics)
            assert got == want, (r, step, {k: (got.get(k), want.get(k)) for k in set(got) | set(want)
                                            if got.get(k) != want.get(k)})
    # Off-policy indeed: every batch after the first was sampled one update behind the learner.
    assert [reference[s]["rollout/staleness"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 1.0, 1.0]
    for rank in (0, 1):
        for name, value in ranks[rank]["a"]["weights"].items():
            assert torch.equal(ranks[rank]["d"]["weights"][name], value), (rank, name)
    # The resumed run's engine got the checkpoint's weights and every later update (version 4 = step 4's).
    assert engine["d"]["version"] == engine["a"]["version"] == 4
    for name, value in engine["a"]["weights"].items():
        assert torch.equal(engine["d"]["weights"][name], value), name


def test_the_checkpointed_batch_keeps_every_rollout_field():
    """The in-flight batch a checkpoint holds comes back with every `Rollouts` field, routing
    replay's experts included (a resumed MoE run must replay the behaviour policy's routing)."""
    import dataclasses

    from rlsd_megatron.data.prompts import PromptRow
    from rlsd_megatron.trainer.off_policy import OneStepOffPolicy
    from rlsd_megatron.trainer.rollouts import Rollouts

    dataset = [PromptRow(index=i, question=f"q{i}", answer=str(i), reference_solution=None, prompt_ids=[1, 2 + i],
                         source="test") for i in range(4)]
    batch = Rollouts([dataset[3], dataset[1]], [[5], [6, 7], [8], [9]], [[-0.5], [-0.1, -0.2], [-1.0], [-2.0]],
                     ["stop", "length", "stop", "stop"], torch.tensor([1.0, 0.0, 0.5, 0.0]), {"reward/mean": 0.4},
                     behaviour_version=3, engine_metrics={"perf/engine_wait_seconds": 0.1},
                     routed_experts=[torch.randint(0, 8, (length, 2, 2), dtype=torch.int16) for length in (2, 3, 2, 2)])
    saving = OneStepOffPolicy(None, object(), dataset, None, None)
    saving.received = batch
    loading = OneStepOffPolicy(None, object(), dataset, None, None)
    loading.load_state_dict(saving.state_dict(), pending=True)
    for field in dataclasses.fields(Rollouts):
        got, want = getattr(loading.received, field.name), getattr(batch, field.name)
        if field.name == "rewards":
            assert torch.equal(got, want)
        elif field.name == "routed_experts":
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        else:
            assert got == want, field.name
