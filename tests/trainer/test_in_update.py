"""`train.student_log_probs_in_update`: the student's log-probs from the update's own forward give
the same step as the separate score pass (PP=2 over gloo, RLSD with the live teacher and TIS),
with one forward fewer."""

from __future__ import annotations

import torch

from tests.trainer.test_trainer_step import TINY


def _optimizer_state(learner) -> list[torch.Tensor]:
    """Every tensor of the inner torch optimizers' state (Adam moments, step), in a fixed order."""
    tensors = []
    for wrapper in getattr(learner.optimizer, "chained_optimizers", [learner.optimizer]):
        inner = wrapper.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                tensors += [state[k].clone() for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return tensors


def one_step(in_update: bool, log_dir: str) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    # One micro-batch per rank (16 sequences): the per-micro-batch metrics are the batch's.
    cfg = load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "train.micro_batch_size=16", "algorithm.method=rlsd", "algorithm.teacher_weights=live",
        "algorithm.tis_cap=2.0", "parallel.pp=2", f"train.student_log_probs_in_update={in_update}",
        f"logging.dir={log_dir}"])
    with model_parallel(pp=2, seed=cfg.train.seed):
        trainer = Trainer(cfg)
        trainer.sync_weights()
        forwards = []
        forward_sequences = trainer.learner.forward_sequences
        trainer.learner.forward_sequences = lambda *a, **k: forwards.append(1) or forward_sequences(*a, **k)
        trainer.step = 1
        metrics = trainer.train_step()
        out = {"metrics": metrics, "params": trainer.learner.full_state(), "forwards": len(forwards),
               "optimizer": _optimizer_state(trainer.learner)}
        trainer.close()
    return out


def both(log_dir: str) -> dict:
    return {flag: one_step(flag, f"{log_dir}/{flag}") for flag in (False, True)}


def test_student_log_probs_in_update_equal_the_score_pass(dist_pool, tmp_path):
    for rank, result in enumerate(dist_pool(2).run(both, str(tmp_path), timeout=600)):
        off, on = result[False], result[True]
        assert (off["forwards"], on["forwards"]) == (2, 1), rank  # student + teacher vs the teacher only
        # The update's forward is the score pass's (same weights, micro-batches and kernels): bit for bit.
        for name in off["params"]:
            assert torch.equal(off["params"][name], on["params"][name]), (rank, name)
        assert len(off["optimizer"]) == len(on["optimizer"]) > 0
        for a, b in zip(off["optimizer"], on["optimizer"]):
            assert torch.equal(a, b), rank
        if rank == 1:  # the last stage logs
            m_off, m_on = off["metrics"], on["metrics"]
            assert m_off["train/grad_norm"] > 0 and m_off["rlsd/delta_abs_mean"] > 1e-3
            for key in ("train/loss", "train/grad_norm", "rlsd/lambda", "rlsd/delta_mean", "rlsd/weight_mean",
                        "rollout/logprob_mismatch_mean", "rollout/logprob_mismatch_max", "train/ratio_max"):
                # Metrics are float32 means, the same sums in either place (one micro-batch): 1e-6 relative.
                assert abs(m_off[key] - m_on[key]) <= 1e-6 * max(1.0, abs(m_off[key])), (key, m_off[key], m_on[key])
