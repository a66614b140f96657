"""The RL loop: `Trainer(cfg).run()` on every rank of an initialised world.

One step, `Trainer.train_step`, in its verbs:
- collect: draw this data-parallel rank's prompts; the engine (first rank of each model-parallel
  group) generates G responses per prompt and rewards them; DAPO's dynamic sampling drops
  all-equal groups and draws again until the batch is full (`rollouts.py`);
- score: the student's log-probs of the rollout tokens (the ratio's "old" log-probs: with one
  optimizer step per rollout batch they are the current policy's, so the first ratio is exactly
  1), the KL reference's, and for teacher methods the teacher's in its context (`teacher.py`);
- advantages: group-normalised rewards → the method's token advantages (`objectives.py`, by the
  method's record in `algorithms/methods.py`);
- update: the loss's per-token fields are assembled from the rollouts and scores, then optimizer
  steps run through Megatron's schedules, the loss normalised by global counts (`update.py`);
  distillation methods get the teacher's logits inside each step, a chunk of micro-batches at a
  time (`distillation.py`); then the teacher policy updates its copy;
- sync: the learner's weights are pushed to the engines; the step's metrics are logged.

Score, advantages and the update's inputs are `StepScoring`'s (`scoring.py`), which also holds
what `train.student_log_probs_in_update` changes in them (`in_update.py`).

The engines' life cycle (which one a rank holds, the learner's offload around generation and
saves, sleep/wake, the weight sync) is `EngineSide`'s (`engine_side.py`). With
`rollout.placement=separate` the engines run on their own ranks (`rollout/separate.py`) and
each replica's first rank holds a handle on one; with `train.off_policy_steps=1` the next step's
prompts go to it before this step trains (`off_policy.py`), and a checkpoint holds that batch.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import Config, config_to_dict
from rlsd_megatron.eval.in_training import training_benchmarks
from rlsd_megatron.logging.metrics import PhaseTimer
from rlsd_megatron.parallel.agreement import same_on_every_rank
from rlsd_megatron.parallel.state import learner_group, learner_world_size, replica_group, wait_for_every_rank
from rlsd_megatron.rollout.separate_failures import post_failure
from rlsd_megatron.trainer import distillation, objectives
from rlsd_megatron.trainer.engine_side import EngineSide
from rlsd_megatron.trainer.off_policy import Draw, OneStepOffPolicy, staleness
from rlsd_megatron.trainer.rollouts import Rollouts, StepScores, collect_rollouts, generate_and_score
from rlsd_megatron.trainer.stopping import (StepAbandoned, StopController, agreed_stop_reason, fault_injection_point,
                                            report_stop, run_end_message)
from rlsd_megatron.trainer.scoring import StepScoring
from rlsd_megatron.trainer.training_state import (load_training_state, prune_checkpoints, resolve_resume, rng_state,
                                                  save_training_state, set_rng_state)
from rlsd_megatron.trainer.update import update_policy


def _every(step: int, interval: int) -> bool:
    """Periodic work (validation, checkpoints) is due at this step; an interval of 0 disables it."""
    return interval > 0 and step % interval == 0


class Trainer:
    """Owns the learner, the engine, data, rewards, the teacher policy, the frozen scoring models
    (OPD's teacher, the KL reference) and logging of one run."""

    def __init__(self, cfg: Config, *, impl: str = "local", stop: StopController | None = None):
        from megatron.core import parallel_state

        from rlsd_megatron.data.build import build_run_datasets
        from rlsd_megatron.data.loader import PromptLoader, validation_rows
        from rlsd_megatron.data.readers import DataError
        from rlsd_megatron.learner.frozen_model import FrozenModel
        from rlsd_megatron.learner.learner import Learner
        from rlsd_megatron.learner.offload import allocation_region, create_optimizer_state
        from rlsd_megatron.logging.metrics import MetricsLogger
        from rlsd_megatron.rewards import RewardScorer
        from rlsd_megatron.trainer.reference import KLReference

        self.cfg = cfg
        # The launcher installs it before building the trainer, so that a stop signal during
        # start-up (minutes at 70B) is kept, not fatal; `run()` installs it otherwise.
        self.stop = stop if stop is not None else StopController.from_environment()
        self.scorer = self.benchmarks = self.engine_side = self.logger = None
        try:
            self.replica_group = replica_group()
            self.dp_group = parallel_state.get_data_parallel_group()
            self.dp_rank, self.dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
            self.hosts_engine = dist.get_rank(self.replica_group) == 0
            # Inputs first: a bad data row or a missing checkpoint stops every rank here, in seconds,
            # not after the model (minutes per rank at 70B) and the engine are built.
            self.dataset, val_dataset = same_on_every_rank(lambda: build_run_datasets(cfg), DataError,
                                                            group=learner_group())
            resume = resolve_resume(cfg.checkpoint)
            with allocation_region(cfg.train.offload):
                self.learner = Learner(cfg, impl=impl)
                if cfg.train.offload == "torch_memory_saver":
                    create_optimizer_state(self.learner)
            self.engine_side = EngineSide(cfg, self.learner, hosts_engine=self.hosts_engine, dp_rank=self.dp_rank,
                                          replica_group=self.replica_group)
            # The frozen scorers before the engine, which sizes its KV cache by the memory still free.
            self.teacher_model = FrozenModel(cfg, cfg.algorithm.teacher_model, setting="algorithm.teacher_model",
                                             impl=impl) if cfg.algorithm.teacher_weights == "separate" else None
            self.reference = KLReference(cfg, self.learner, impl=impl) if cfg.algorithm.kl_coef else None
            self.engine_side.start()
            self.loader = PromptLoader(self.dataset, global_batch_size=cfg.train.prompts_per_step,
                                       dp_rank=self.dp_rank, dp_size=self.dp_size, seed=cfg.train.seed,
                                       shuffle=cfg.data.shuffle)
            self.val_rows = validation_rows(val_dataset, dp_rank=self.dp_rank, dp_size=self.dp_size) if val_dataset else []
            self.scorer = RewardScorer(cfg.reward, task=cfg.data.task) if self.hosts_engine else None
            self.benchmarks = training_benchmarks(cfg.train, self.dataset, self.dp_rank, self.dp_size, self.hosts_engine)
            self.teacher = alg.TeacherWeightPolicy(
                cfg.algorithm.teacher_weights, sync_interval=cfg.algorithm.teacher_sync_interval,
                ema_rate=cfg.algorithm.teacher_ema_rate)
            self.teacher.initialize(self.learner.local_weights())
            self.scoring = StepScoring(cfg, self.learner, self.dataset, reference=self.reference, teacher=self.teacher,
                                       teacher_model=self.teacher_model, dp_group=self.dp_group)
            self.off_policy = OneStepOffPolicy(self._next_draw, self.engine, self.dataset, self.scorer,
                                               self.replica_group) if cfg.train.off_policy_steps else None
            self.logger = MetricsLogger(cfg.logging, total_steps=cfg.train.steps,
                                        enabled=dist.get_rank() == learner_world_size() - 1)
            self.logger.write_config(config_to_dict(cfg))
            self.step = 0
            self._draws = 0  # prompt batches drawn (numbers the sampling seeds)
            self._saved_step: int | None = None  # the step of the last checkpoint (saved or resumed)
            self._last_save_seconds: float | None = None
            if resume is None and self.logger.earlier_event_files:
                self.logger.message(f"warning: {cfg.logging.dir} already holds {len(self.logger.earlier_event_files)} "
                                    "event file(s) of an earlier run, which tensorboard will mix with this one's; "
                                    "give this run its own logging.dir")
            if resume is not None:
                load_training_state(self, resume.path)
                self._saved_step = self.step
                self.logger.message(f"resumed from {resume.path} at step {self.step}")
            elif cfg.checkpoint.init_from:
                from rlsd_megatron.checkpoint import load_checkpoint

                load_checkpoint(cfg.checkpoint.init_from, self.learner.model, model=cfg.model)
                self.learner.optimizer.reload_model_params()
                self.start_from_learner_weights()
        except BaseException as error:
            post_failure(error)  # first: separate engine ranks then stop by themselves, asking nothing more
            self.close()  # the engine and the verifier processes, when start-up fails after them
            raise

    @property
    def engine(self):
        """This rank's rollout engine (None on ranks that host none)."""
        return self.engine_side.engine

    @property
    def learner_offload(self):
        """The learner's `LearnerOffload` (None without `train.offload`)."""
        return self.engine_side.offload

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        installed_here = not self.stop.installed
        if installed_here:
            self.stop.install()
        try:
            self._run_steps()
        except BaseException as error:
            post_failure(error)  # separate engine ranks stop now, not at the wait timeout
            raise
        finally:
            if installed_here:
                self.stop.restore()
        self.close()

    def _run_steps(self) -> None:
        """Warm start, then RL steps until the last or an agreed stop (a stop signal, or too little
        time left in the job for one more step and its save: `trainer/stopping.py`)."""
        if self.step == 0 and self.cfg.warm_start.max_steps > 0:
            self.warm_start()
        self.sync_weights()
        reason = None
        while self.step < self.cfg.train.steps:
            reason = agreed_stop_reason(self.stop, include_time=True)
            if reason is not None:
                break
            started = time.perf_counter()
            self.step += 1
            try:
                metrics = self.train_step()
            except StepAbandoned as abandoned:
                reason = abandoned.reason
                break
            last = self.step == self.cfg.train.steps
            if last or _every(self.step, self.cfg.train.eval_interval):
                metrics.update(self.validate())
            self.stop.record_step(time.perf_counter() - started)
            metrics["perf/step_seconds"] = time.perf_counter() - started
            if self._last_save_seconds is not None:
                metrics["perf/save_seconds"] = self._last_save_seconds
            self.logger.log(self.step, metrics)
            fault_injection_point(self.step)
            if last or _every(self.step, self.cfg.checkpoint.save_interval):
                self.save()
        if reason is not None and self._saved_step != self.step:
            self.save()
        if reason is not None and dist.get_rank() == 0:
            report_stop(reason)
        self.logger.message(run_end_message(reason, self.step, logging_dir=self.cfg.logging.dir,
                                            checkpoint_dir=self.cfg.checkpoint.dir))

    def save(self) -> None:
        """A training-state checkpoint of this step under `checkpoint.dir` (if set)."""
        ckpt = self.cfg.checkpoint
        if ckpt.dir is None:
            return
        started = time.perf_counter()
        with self.engine_side.learner_resident(version=self.step):
            if self.off_policy is not None:  # the checkpoint holds the next step's batch, not a request for it
                self.off_policy.settle()
            path = save_training_state(self, ckpt.dir)
        if dist.get_rank() == 0:
            prune_checkpoints(ckpt.dir, keep_last=ckpt.keep_last)
        self._last_save_seconds = time.perf_counter() - started
        self.stop.record_save(self._last_save_seconds)
        self._saved_step = self.step
        self.logger.message(f"saved {path} ({self._last_save_seconds:.1f} s)")

    def _step_start(self) -> dict:
        """What generation changes before anything is trained: enough to rewind the step."""
        return {"loader": self.loader.state_dict(), "draws": self._draws, "rng": rng_state(),
                "drawn_earlier": self.off_policy is not None and self.off_policy.pending}

    def _rewind(self, start: dict, rollouts: Rollouts) -> None:
        self.loader.load_state_dict(start["loader"])
        self._draws = start["draws"]
        set_rng_state(start["rng"])
        if start["drawn_earlier"]:  # off-policy: the batch drawn last step stays this step's
            self.off_policy.put_back(rollouts)
        self.step -= 1

    def start_from_learner_weights(self) -> None:
        """The learner's weights are the policy RL starts from (after a warm start or
        `checkpoint.init_from`): the teacher copy and the KL reference copy are taken from them."""
        self.teacher.initialize(self.learner.local_weights())
        if self.reference is not None:
            self.reference.restart()

    def warm_start(self) -> None:
        """Supervised warm start (`warm_start` config), then RL starts from its weights."""
        from rlsd_megatron.trainer.warm_start import warm_start_learner

        warm_start_learner(self.cfg, self.learner, self.dataset, self.val_rows, self.logger, dp_rank=self.dp_rank,
                           dp_size=self.dp_size)
        self.start_from_learner_weights()

    def train_step(self) -> dict[str, float]:
        """One RL step, the step's verbs in order: collect this rank's rollouts (generate and
        reward), score them (student, reference and teacher log-probs), turn rewards into token
        advantages, update the policy, sync the engines' weights; returns the step's metrics,
        means over data-parallel ranks. Raises `StepAbandoned`, with the step rewound, when a
        stop was agreed during generation."""
        timer = PhaseTimer()
        with timer("generate"):
            start, rollouts = self._step_start(), self.collect_rollouts()
            self.engine_side.learner_back()  # colocated: the learner's phases need the engine's GPU memory
        self._abandon_if_stopped(start, rollouts)
        if self.off_policy is not None and self.step < self.cfg.train.steps:
            self.off_policy.submit_next()  # generated with the weights of before this update, while it trains
        with timer("score"):
            scores = self.scoring.score(rollouts, step=self.step)
            advantages = self.scoring.advantages(rollouts, scores, step=self.step)
        with timer("train"):
            fields, teacher_inputs = self.scoring.update_inputs(rollouts, scores, advantages)
            train_stats = self.update(scores.sequences, fields, teacher_inputs, images=rollouts.images())
            self.teacher.on_step(self.step, self.learner.local_weights())
        with timer("sync"):
            sync = self.sync_weights()
        return self.step_metrics(rollouts, scores, advantages, train_stats, sync, timer)

    def step_metrics(self, rollouts: Rollouts, scores: StepScores, advantages: objectives.TokenAdvantages | None,
                     train_stats: dict[str, float], sync, timer: PhaseTimer) -> dict[str, float]:
        """What one step logs, as means over data-parallel ranks (`reduce_over_data_parallel`)."""
        tokens = sum(len(s) for s in scores.sequences)
        responses = max(len(rollouts.responses), 1)
        return self.reduce_over_data_parallel({
            **rollouts.reward_metrics,
            **rollouts.engine_metrics,
            **staleness(rollouts, self.step - 1),
            "rollout/response_length": float(sum(len(r) for r in rollouts.responses) / responses),
            "rollout/truncated_frac": sum(f == "length" for f in rollouts.finish_reasons) / responses,
            **(scores.mismatch.metrics() if scores.mismatch is not None else {}),
            **(advantages.metrics if advantages is not None else {}),
            # Metrics the loss computed for the score phase (train.student_log_probs_in_update) keep their names.
            **{k if "/" in k else f"train/{k}": v for k, v in train_stats.items()},
            **sync.metrics(),
            **{f"perf/{k}_seconds": v for k, v in timer.seconds.items()},
            **self.engine_side.metrics(),
            **(self.learner.routing_replay.metrics() if self.learner.routing_replay is not None else {}),
            "perf/tokens_per_s": tokens / max(sum(timer.seconds.values()), 1e-9),
        })

    def _abandon_if_stopped(self, start: dict, rollouts: Rollouts) -> None:
        """A safe point: a stop signal that arrived during generation (the longest phase) is honoured
        now rather than after the update, by rewinding the step: its checkpoint is the previous one."""
        reason = agreed_stop_reason(self.stop, include_time=False)
        if reason is not None:
            self._rewind(start, rollouts)
            raise StepAbandoned(reason)

    # ------------------------------------------------------------------------------------------
    def collect_rollouts(self) -> Rollouts:
        """This rank's G responses for each of its prompts (refilled under dynamic sampling)."""
        a = self.cfg.algorithm
        if self.off_policy is not None:  # this step's batch was submitted last step (train_step submits the next)
            rollouts = self.off_policy.next_batch()
        else:
            rollouts = collect_rollouts(self._draw_rollouts, want=self.cfg.train.prompts_per_step // self.dp_size,
                                        group_size=self.cfg.rollout.n, dynamic_sampling=a.dynamic_sampling,
                                        max_rounds=a.dynamic_sampling_max_rounds)
        wait_for_every_rank("generation")  # replicas differ in generation time (and dynamic-sampling rounds)
        return rollouts

    def _draw_rollouts(self) -> Rollouts:
        """The next batch of this rank's prompts, generated with the draw's own seed and scored."""
        draw = self._next_draw()
        return generate_and_score(draw.rows, self.dataset, self.engine, draw.sampling, self.scorer,
                                  group=self.replica_group, prompt_offset=draw.prompt_offset)

    def _next_draw(self) -> Draw:
        """The next batch of this rank's prompts with the draw's own sampling seed."""
        from rlsd_megatron.rollout.provider import sampling_params

        rows = self.loader.next_batch()
        sampling = sampling_params(self.cfg.rollout, stop_token_ids=[self.dataset.eos_id],
                                   seed=self.cfg.train.seed * 1_000_003 + self._draws)
        self._draws += 1
        return Draw(rows, sampling, self.dp_rank * len(rows))

    def update(self, sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]],
               teacher: distillation.TeacherInputs | None = None, *, images: list | None = None) -> dict[str, float]:
        """`ppo_epochs` × `optimizer_steps_per_batch` optimizer steps over this rank's rollouts
        (trainer/update.py)."""
        return update_policy(self.learner, self.cfg, sequences, fields, teacher, dp_group=self.dp_group,
                             step=self.step, images=images)

    def sync_weights(self):
        """Learner weights → the engines as this step's version (`EngineSide.sync`); every rank
        returns the host's `SyncStats`."""
        return self.engine_side.sync(self.step)

    def validate(self) -> dict[str, float]:
        """Mean validation reward with the validation sampling settings; the train.eval_sets benchmarks."""
        from rlsd_megatron.rollout.provider import sampling_params

        metrics = self.benchmarks.evaluate(self.engine, self.dp_group, self.replica_group) if self.benchmarks else {}
        if not self.val_rows:
            return metrics
        sampling = sampling_params(self.cfg.rollout, validation=True, stop_token_ids=[self.dataset.eos_id],
                                   seed=self.cfg.train.seed)
        batch = generate_and_score(self.val_rows, self.dataset, self.engine, sampling, self.scorer,
                                   group=self.replica_group, prompt_offset=self.dp_rank)
        wait_for_every_rank("validation generation")
        totals = torch.tensor([float(batch.rewards.sum()), float(len(batch.rewards))], dtype=torch.float64)
        dist.all_reduce(totals, group=self.dp_group)
        return {**metrics, "val/reward": float(totals[0] / totals[1])}

    def reduce_over_data_parallel(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means over data-parallel ranks (the loss is summed: each rank holds its share)."""
        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values, group=self.dp_group)
        return {k: float(v) if k == "train/loss" else float(v) / self.dp_size for k, v in zip(keys, values)}

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        if self.benchmarks is not None:
            self.benchmarks.close()
        if self.engine_side is not None:  # None when start-up failed before it (and the logger)
            self.engine_side.close()
        if self.logger is not None:
            self.logger.close()
