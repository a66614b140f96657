"""`train.offload=copy`: the learner's weights, gradients and optimizer state leave their device
after the weight sync (the tensors really release their memory) and come back bit for bit:
two RL steps and a checkpoint save with offload equal two steps without, under Megatron's DDP
with the distributed optimizer (DP=2 over gloo)."""

from __future__ import annotations

import torch

from tests.trainer.test_in_update import _optimizer_state
from tests.trainer.test_trainer_step import TINY


def _released(learner) -> dict[str, bool]:
    """Whether every weight, main grad and optimizer state tensor holds no memory now."""
    optimizer = [value for wrapper in getattr(learner.optimizer, "chained_optimizers", [learner.optimizer])
                 for state in wrapper.optimizer.state.values() for value in state.values()
                 if isinstance(value, torch.Tensor) and value.dim() > 0]
    return {
        "weights": all(p.untyped_storage().nbytes() == 0 for _, p in learner.named_parameters()),
        "grads": all(p.main_grad.untyped_storage().nbytes() == 0 for _, p in learner.named_parameters()),
        "optimizer": bool(optimizer) and all(t.untyped_storage().nbytes() == 0 for t in optimizer),
    }


def two_steps(offload: str, log_dir: str) -> dict:
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "algorithm.method=grpo", "parallel.use_distributed_optimizer=true", f"train.offload={offload}",
        f"logging.dir={log_dir}/logs", f"checkpoint.dir={log_dir}/ckpt"])
    with model_parallel(seed=cfg.train.seed):
        trainer = Trainer(cfg)
        optimizers = getattr(trainer.learner.optimizer, "chained_optimizers", [trainer.learner.optimizer])
        assert [type(o).__name__ for o in optimizers] == ["DistributedOptimizer"]
        trainer.sync_weights()
        released, metrics = [], []
        for step in (1, 2):
            trainer.step = step
            metrics.append(trainer.train_step())
            released.append(_released(trainer.learner))
        trainer.save()  # brings the learner back for the save, then off again
        released.append(_released(trainer.learner))
        if trainer.learner_offload is not None:
            trainer.learner_offload.onload()
        out = {"params": trainer.learner.full_state(), "optimizer": _optimizer_state(trainer.learner),
               "released": released, "metrics": metrics}
        trainer.close()
    return out


def both(log_dir: str) -> dict:
    return {mode: two_steps(mode, f"{log_dir}/{mode}") for mode in ("none", "copy")}


def test_offloaded_steps_equal_resident_ones(dist_pool, tmp_path):
    for rank, result in enumerate(dist_pool(2).run(both, str(tmp_path), timeout=600)):
        resident, offloaded = result["none"], result["copy"]
        everything = {"weights": True, "grads": True, "optimizer": True}
        assert offloaded["released"] == [everything] * 3, rank
        assert not any(any(r.values()) for r in resident["released"]), rank
        for name in resident["params"]:
            assert torch.equal(resident["params"][name], offloaded["params"][name]), (rank, name)
        assert len(resident["optimizer"]) == len(offloaded["optimizer"]) > 0
        for a, b in zip(resident["optimizer"], offloaded["optimizer"]):
            assert torch.equal(a, b), rank
        for m_res, m_off in zip(resident["metrics"], offloaded["metrics"]):
            assert m_res["train/grad_norm"] > 0 and m_res["train/loss"] == m_off["train/loss"]
            assert m_off["perf/offload_seconds"] > 0 and m_off["perf/onload_seconds"] > 0
            assert "perf/offload_seconds" not in m_res


def test_torch_memory_saver_without_a_gpu_says_what_to_use():
    import pytest

    from rlsd_megatron.learner.offload import allocation_region

    if torch.cuda.is_available():
        pytest.skip("the error is for machines without CUDA")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU .* use train\.offload=copy"):
        with allocation_region("torch_memory_saver"):
            pass
