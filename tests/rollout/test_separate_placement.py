"""`rollout.placement=separate`: an engine on its own rank gets the learner's weights by broadcast
and generates what a colocated engine generates. One 3-process launch: ranks 0-1 train (dp=2, so
two replica hosts share one engine rank), rank 2 hosts the engine; the same step with a colocated
engine on rank 0 (rank 2 sitting out) is the reference."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.test_trainer_step import TINY


def _config(placement: str, log_dir: str):
    from rlsd_megatron.config import load_config

    return load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "algorithm.method=grpo", f"rollout.placement={placement}",
        f"rollout.engine_ranks={1 if placement == 'separate' else 0}", f"logging.dir={log_dir}/{placement}"])


def trained_step(cfg) -> dict:
    """A learner rank's weight sync and one training step: the rollouts, the metrics and (with a
    colocated engine) the engine's weights."""
    from rlsd_megatron.trainer.trainer import Trainer

    trainer = Trainer(cfg)
    trainer.sync_weights()
    trainer.step = 1
    seen = []
    collect = trainer.collect_rollouts
    trainer.collect_rollouts = lambda: seen.append(collect()) or seen[-1]
    metrics = trainer.train_step()
    weights = trainer.engine.writable_weights() if cfg.rollout.placement == "colocated" and trainer.engine else None
    out = {"responses": seen[0].responses, "engine_log_probs": seen[0].engine_log_probs, "metrics": metrics,
           "weights": {n: t.clone() for n, t in weights.items()} if weights else None}
    trainer.close()
    return out


def one_step(placement: str, log_dir: str) -> dict:
    """A weight sync and one training step; returns the rollouts, the metrics and the engine's weights."""
    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel, weight_broadcast_group
    from rlsd_megatron.rollout.provider import create_engine
    from rlsd_megatron.rollout.separate import serve_engine

    cfg = _config(placement, log_dir)
    with model_parallel(seed=cfg.train.seed, engine_ranks=1):
        if is_engine_rank():
            if placement == "colocated":  # sits out
                return {}
            engine = create_engine(cfg)
            served = serve_engine(engine, weight_broadcast_group())
            return {"served": served, "weights": {n: t.clone() for n, t in engine.writable_weights().items()},
                    "version": engine.health().weight_version}
        return trained_step(cfg)


def both_placements(log_dir: str) -> dict:
    return {placement: one_step(placement, log_dir) for placement in ("colocated", "separate")}


def test_separate_engine_rank_matches_colocated(dist_pool, tmp_path):
    ranks = dist_pool(3).run(both_placements, str(tmp_path), timeout=900)
    engine = ranks[2]["separate"]
    # Two syncs (start, after the step) and one generate request per replica.
    assert engine["served"] == 4 and engine["version"] == 1
    # The broadcast weights equal the colocated engine's, which the learner wrote in place (exact: fp32 copies).
    reference = ranks[0]["colocated"]["weights"]
    assert set(engine["weights"]) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(engine["weights"][name], tensor), name
    for rank in (0, 1):  # both replicas: the same rollouts (per-sample seeds) and the same step
        colocated, separate = ranks[rank]["colocated"], ranks[rank]["separate"]
        assert separate["responses"] == colocated["responses"] and len(colocated["responses"]) == 8
        assert separate["engine_log_probs"] == colocated["engine_log_probs"]
        for key in ("train/loss", "train/grad_norm", "rollout/logprob_mismatch_mean"):
            assert separate["metrics"][key] == colocated["metrics"][key], (rank, key)
    assert ranks[1]["separate"]["metrics"]["rollout/logprob_mismatch_mean"] < 1e-5  # the engine has the weights


@pytest.mark.parametrize("overrides, world, expected", [
    (["rollout.placement=separate"], 4, "needs 1 <= rollout.engine_ranks < the world size (4), got 0"),
    (["rollout.placement=separate", "rollout.engine_ranks=4"], 4, "got 4"),
    (["rollout.engine_ranks=2"], 4, "with rollout.placement=colocated"),
    (["rollout.placement=separate", "rollout.engine_ranks=1", "rollout.engine_tp=2"], 4, "rollout.engine_tp=2"),
    (["rollout.placement=separate", "rollout.engine_ranks=1", "train.offload=copy"], 4, "makes room for nothing"),
    (["rollout.placement=separate", "rollout.engine_ranks=1", "train.off_policy_steps=1",
      "train.student_log_probs_in_update=true"], 4, "not those of the weights one step older"),
    # The layout is checked against the learner's ranks: 3 of 4 are not divisible by tp=2.
    (["rollout.placement=separate", "rollout.engine_ranks=1", "parallel.tp=2"], 4, "world size 3"),
])
def test_placement_config_problems(overrides, world, expected):
    from rlsd_megatron.config import ConfigError, load_config
    from rlsd_megatron.config_checks import validate_config

    cfg = load_config("examples/configs/cpu_demo.yaml", overrides)
    with pytest.raises(ConfigError, match="invalid configuration") as error:
        validate_config(cfg, world, cuda_available=False, te_available=False)
    assert expected in str(error.value)


def test_separate_layout_is_accepted():
    from rlsd_megatron.config import load_config
    from rlsd_megatron.config_checks import validate_config

    cfg = load_config("examples/configs/cpu_demo.yaml", ["rollout.placement=separate", "rollout.engine_ranks=1",
                                                          "parallel.tp=2", "checkpoint.dir=/tmp/x"])
    validate_config(cfg, 3, cuda_available=False, te_available=False)  # 2 learners at tp=2 + 1 engine rank
    cfg.rollout.engine_ranks = 3
    validate_config(cfg, 5, cuda_available=False, te_available=False)  # 1 replica splits its batch over 3 engines


def test_replicas_and_engines_pair_up():
    from rlsd_megatron.rollout.separate import engine_ranks_for

    engines = [8, 9, 10]
    # Fewer engines than replicas: round robin, replicas share one.
    assert [engine_ranks_for(r, 4, engines) for r in range(4)] == [[8], [9], [10], [8]]
    # More: each replica splits its batch over its share of them.
    assert [engine_ranks_for(r, 2, engines) for r in range(2)] == [[8, 10], [9]]
    assert engine_ranks_for(0, 1, engines) == engines


def split_over_engines(log_dir: str) -> dict:
    """One replica (rank 0) and two engine ranks: the same step with the batch split over both
    engines, and with a colocated engine on rank 0 (ranks 1 and 2 sit out)."""
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel, weight_broadcast_group
    from rlsd_megatron.rollout.provider import create_engine
    from rlsd_megatron.rollout.separate import serve_engine

    results = {}
    for placement, engine_ranks in (("colocated", 0), ("separate", 2)):
        cfg = load_config("examples/configs/cpu_demo.yaml", [
            *TINY, "algorithm.method=grpo", f"rollout.placement={placement}", f"rollout.engine_ranks={engine_ranks}",
            f"logging.dir={log_dir}/{placement}"])
        with model_parallel(seed=cfg.train.seed, engine_ranks=2):
            if is_engine_rank():
                if placement == "separate":
                    engine = create_engine(cfg)
                    results[placement] = {"served": serve_engine(engine, weight_broadcast_group())}
                continue
            results[placement] = trained_step(cfg)
    return results


def test_one_replica_splits_its_batch_over_two_engines(dist_pool, tmp_path):
    ranks = dist_pool(3).run(split_over_engines, str(tmp_path), timeout=900)
    # Each engine rank: two weight syncs (start, after the step) and its share of the one generate request.
    assert ranks[1]["separate"]["served"] == ranks[2]["separate"]["served"] == 3
    colocated, separate = ranks[0]["colocated"], ranks[0]["separate"]
    assert separate["responses"] == colocated["responses"] and len(colocated["responses"]) == 16
    assert separate["engine_log_probs"] == colocated["engine_log_probs"]  # per-sample seeds of the whole batch
    for key in ("train/loss", "train/grad_norm", "rollout/logprob_mismatch_mean"):
        assert separate["metrics"][key] == colocated["metrics"][key], key


def off_policy_steps(log_dir: str) -> dict:
    """Three one-step-off-policy steps at tp=2 (ranks 0-1, one replica) with the engine on rank 2:
    per step the metrics, when the engine began the batch received and when the update ended."""
    import time

    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel
    from rlsd_megatron.rollout.engine import SamplingParams
    from rlsd_megatron.rollout.separate import run_engine_rank
    from rlsd_megatron.trainer.trainer import Trainer

    cfg = load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "algorithm.method=grpo", "rollout.placement=separate", "rollout.engine_ranks=1", "parallel.tp=2",
        "train.off_policy_steps=1", "train.steps=3", f"logging.dir={log_dir}/off_policy"])
    with model_parallel(tp=2, seed=cfg.train.seed, engine_ranks=1):
        if is_engine_rank():
            return {"served": run_engine_rank(cfg)}
        trainer = Trainer(cfg)
        trainer.sync_weights()
        update, steps = trainer.update, []

        def timed_update(*args, **kwargs):
            out = update(*args, **kwargs)
            steps[-1]["update_ended"] = time.time()
            return out

        trainer.update = timed_update
        for step in (1, 2, 3):
            trainer.step = step
            steps.append({})
            steps[-1]["metrics"] = trainer.train_step()
            reply = trainer.engine.last_reply if trainer.engine is not None else None
            steps[-1]["generation_started"] = reply.started if reply is not None else None
            if step == 2 and trainer.engine is not None:  # a direct request (validation) with step 3's in flight
                steps[-1]["direct"] = trainer.engine.generate([[3, 4, 5]], SamplingParams(n=1, max_new_tokens=2))
        trainer.close()
        return {"steps": steps}


def test_one_step_off_policy_overlaps_generation_with_the_update(dist_pool, tmp_path):
    ranks = dist_pool(3).run(off_policy_steps, str(tmp_path), timeout=900)
    assert ranks[2]["served"] == 8  # 4 syncs (start + 3 steps), 3 batches (none after the last step), 1 direct
    host, last = ranks[0]["steps"], ranks[1]["steps"]
    # The direct request got its own answer, not the batch in flight (which step 3 then trained on).
    assert [len(g.token_ids) for g in host[1]["direct"]] == [2] and host[1]["direct"][0].prompt_index == 0
    # Step n+1's batch began generating on the engine rank before step n's update ended (one host clock).
    for n in (0, 1):
        assert host[n + 1]["generation_started"] < host[n]["update_ended"], n
    m = [s["metrics"] for s in last]
    # Step 1 is sampled with the weights it trains (nothing to overlap with); later batches one update stale.
    assert [s["rollout/staleness"] for s in m] == [0.0, 1.0, 1.0]
    # The ratio's old log-probs are the engine's: at step 1 the same weights (ratio ~1), from step 2 the
    # learner is one update ahead of the behaviour policy, so the first ratio moves off 1.
    assert abs(m[0]["train/ratio_max"] - 1) < 1e-4 and abs(m[0]["train/ratio_min"] - 1) < 1e-4
    assert m[1]["train/ratio_max"] - m[1]["train/ratio_min"] > 1e-3
    assert m[1]["rollout/logprob_mismatch_mean"] > 100 * m[0]["rollout/logprob_mismatch_mean"]
    for s in m:
        assert s["perf/engine_generate_seconds"] > 0 and 0 <= s["perf/overlap_frac"] <= 1
    # The overlap metric is the part of the generation the learner did not wait for (the timestamps
    # above show the overlap itself; how much of it there is depends on the machine's load).
    for s in m:
        want = max(s["perf/engine_generate_seconds"] - s["perf/learner_wait_seconds"], 0.0)
        assert abs(s["perf/overlap_seconds"] - want) < 1e-9


START_UP_FAILURES = {
    # checkpoint.resume=auto without checkpoint.dir: every learner stops before its model and its engine handle.
    "learners, before their engine handle": ["checkpoint.resume=auto"],
    # A missing checkpoint to start from: the learners stop after connecting to the engine rank.
    "learners, after connecting": ["checkpoint.init_from=/nonexistent/rlsd_checkpoint"],
    # FP8 rollout weights need SGLang: the engine rank's create_engine fails, the learners are fine.
    "engine": ["rollout.fp8_weights=true"],
}


def start_up_failures(log_dir: str) -> dict:
    """Each case of `START_UP_FAILURES` with the learners on ranks 0-1 (`Trainer`, its first sync and
    step) and an engine rank (`run_engine_rank`): per case, this rank's error (type, message, the failure's error_type) and
    the seconds from the layout's start until it came."""
    import time

    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import is_engine_rank, model_parallel
    from rlsd_megatron.rollout.separate import run_engine_rank
    from rlsd_megatron.trainer.trainer import Trainer

    out = {}
    for index, (case, overrides) in enumerate(START_UP_FAILURES.items()):
        cfg = load_config("examples/configs/cpu_demo.yaml", [
            *TINY, "algorithm.method=grpo", "rollout.placement=separate", "rollout.engine_ranks=1",
            f"logging.dir={log_dir}/{index}", *overrides])
        with model_parallel(seed=cfg.train.seed, engine_ranks=1):
            started = time.monotonic()
            try:
                if is_engine_rank():
                    run_engine_rank(cfg)
                else:
                    trainer = Trainer(cfg)
                    try:  # what rank 0 (the weights) and each replica's host (its rollouts) ask the engine
                        trainer.sync_weights()
                        trainer.step = 1
                        trainer.train_step()
                    finally:
                        trainer.close()
                out[case] = None
            except Exception as error:
                out[case] = (type(error).__name__, str(error), getattr(error, "error_type", None),
                             time.monotonic() - started)
    return out


def test_a_start_up_failure_on_either_side_stops_the_other_at_once(dist_pool, tmp_path):
    # Without the failure reaching it, the other side would wait for parallel.wait_timeout_minutes (60).
    learner, other, engine = dist_pool(3).run(start_up_failures, str(tmp_path), timeout=300)
    for case in ("learners, before their engine handle", "learners, after connecting"):
        kind, message, _, _ = learner[case]
        assert kind == "CheckpointError", (case, learner[case])
        kind, engine_message, error_type, seconds = engine[case]
        assert kind == "PeerFailure" and error_type == "rlsd_megatron.checkpoint.directory.CheckpointError", case
        # The learners' own error, named as theirs.
        assert engine_message.startswith("learner rank ") and f"CheckpointError: {message}" in engine_message, case
        assert seconds < 30, (case, seconds)
    kind, message, _, _ = engine["engine"]
    assert kind == "ConfigError" and "rollout.fp8_weights=true needs the SGLang backend" in message
    for rank_result in (learner, other):
        kind, learner_message, error_type, seconds = rank_result["engine"]
        assert kind == "PeerFailure" and error_type == "rlsd_megatron.config.ConfigError"
        assert learner_message == f"rollout engine rank 2 failed: ConfigError: {message}"
        assert seconds < 30, seconds


def test_rlsd_train_reports_a_bad_data_row_once_and_every_rank_exits(dist_pool, tmp_path):
    """`rlsd-train` with an engine rank: the learners find the bad row after start-up (in the trainer);
    the engine rank joins their report, so rank 0 prints it once, as without engine ranks, and every
    rank exits with status 2 at once (not after the report's or the engine's wait timeout)."""
    import json

    from tests.data.conftest import build_tokenizer
    from tests.test_train_cli import DEMO, run_main

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1? " * 40, "answer": "2"}) + "\n")
    argv = ["--config", DEMO, "data.task=null", "warm_start.max_steps=0", f"data.train_files=[{data}]",
            f"data.tokenizer_dir={tokenizer}", "data.max_prompt_length=64", "model.vocab_size=320",
            f"logging.dir={tmp_path / 'logs'}",
            "rollout.placement=separate", "rollout.engine_ranks=1"]
    first, second, engine = dist_pool(3).run(run_main, [argv] * 3, timeout=50)
    assert first["stderr"].startswith(f"rlsd-train: error: {data}, line 1: the prompt is ")
    assert len(first["stderr"].splitlines()) == 1
    assert second["stderr"] == engine["stderr"] == ""
    assert first["status"] == second["status"] == engine["status"] == 2
