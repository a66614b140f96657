"""The supervised warm start (the CPU demo's first phase) at TP=2 over gloo: it trains, switches
phase and stops on measured accuracy, warns when its step budget runs out, and saves its weights."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
    "parallel.tp=2", "warm_start.max_steps=4", "warm_start.eval_interval=2", "warm_start.prompts_per_step=8",
    "train.prompts_per_step=4", "rollout.n=2", "train.micro_batch_size=4", "algorithm.teacher_weights=frozen",
]


def warm_start(out: str, *overrides: str) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [*TINY, f"warm_start.output={out}", *overrides])
    with model_parallel(tp=2, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        messages: list[str] = []
        trainer.logger.message = messages.append
        before = trainer.learner.full_state()
        trainer.warm_start()
        after = trainer.learner.full_state()
        teacher, student = trainer.teacher.teacher_state(), trainer.learner.local_weights()
        teacher_follows = teacher.keys() == student.keys() and all(torch.equal(teacher[n], student[n]) for n in student)
        trainer.close()
    return {"messages": messages, "changed": sum(not torch.equal(before[k], after[k]) for k in before),
            "teacher_follows": teacher_follows}


def test_budget_exhausted_warns_and_saves_what_the_teacher_starts_from(dist_pool, tmp_path):
    # Accuracy 0.99 is out of reach in 4 steps: phase 1 runs to the end and says so.
    results = dist_pool(2).run(warm_start, str(tmp_path / "a"), "warm_start.stop_accuracy=0.99")
    messages = results[1]["messages"]  # the last rank logs
    assert [m.split("]")[0] for m in messages if m.startswith("[warm start")] == ["[warm start 2/4, task",
                                                                               "[warm start 4/4, task"]
    assert any(m.startswith("warning: the warm start used all 4 steps and did not learn the task") for m in messages)
    assert all(r["changed"] > 0 and r["teacher_follows"] for r in results)
    assert (tmp_path / "a" / "release").is_dir()


def test_stops_as_soon_as_both_accuracies_are_reached(dist_pool, tmp_path):
    results = dist_pool(2).run(warm_start, str(tmp_path / "b"), "warm_start.stop_accuracy=0.0",
                               "warm_start.hinted_stop_accuracy=0.0")
    messages = results[1]["messages"]
    assert [m.split("]")[0] for m in messages if m.startswith("[warm start")] == ["[warm start 2/4, task"]
    assert not any(m.startswith("warning") for m in messages)
