"""The RL loop: data → rollouts → rewards → log-probs (student, self-teacher) → update → sync.

`Trainer(cfg).run()` on every rank of an initialised world. One step, top to bottom:

1. draw this data-parallel rank's prompts; the engine (first rank of each model-parallel group)
   generates G responses per prompt and scores them; DAPO's dynamic sampling drops all-equal
   groups and draws again until the batch is full;
2. the learner recomputes the student's log-probs of the rollout tokens (the ratio's "old"
   log-probs: with one optimizer step per rollout batch they are the current policy's, so the
   first ratio is exactly 1); for teacher methods, the teacher's log-probs of the same tokens in
   the privileged context, with the teacher-weight policy's weights (OPD: its separate teacher
   model, in the student's own context); with a KL term, the reference policy's log-probs;
3. sequence advantages (group-normalised rewards) → token advantages per method;
4. one or more optimizer steps through Megatron's schedules, loss normalised by global counts;
   distillation methods get the teacher's logits inside each step, for a chunk of micro-batches
   right before their forward/backward (trainer/distillation.py);
5. the teacher policy updates its copy; weights are pushed to the engines; metrics are logged.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

import torch
import torch.distributed as dist

from rlsd_megatron import algorithms as alg
from rlsd_megatron.config import Config, config_to_dict
from rlsd_megatron.eval.in_training import training_benchmarks
from rlsd_megatron.parallel.agreement import same_on_every_rank
from rlsd_megatron.parallel.state import replica_group
from rlsd_megatron.trainer import distillation, objectives
from rlsd_megatron.trainer.rollouts import Rollouts, generate_and_score, response_tensors
from rlsd_megatron.trainer.state import (
    load_training_state,
    prune_checkpoints,
    resolve_resume,
    rng_state,
    save_training_state,
    set_rng_state,
)
from rlsd_megatron.trainer.stopping import StepAbandoned, StopController, agreed_stop_reason, report_stop
from rlsd_megatron.trainer.update import update_policy


def _every(step: int, interval: int) -> bool:
    """Periodic work (validation, checkpoints) is due at this step; an interval of 0 disables it."""
    return interval > 0 and step % interval == 0


def _fault_injection_point(step: int) -> None:
    """Test hook: `RLSD_KILL_AT_STEP=N` SIGKILLs this process after step N's update and before
    its checkpoint (what a node failure mid-step does), for the exact-resume test."""
    if os.environ.get("RLSD_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


class PhaseTimer:
    """Wall time per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


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
        from rlsd_megatron.logging.metrics import MetricsLogger
        from rlsd_megatron.rewards import RewardScorer
        from rlsd_megatron.rollout.mismatch import MismatchMonitor
        from rlsd_megatron.rollout.provider import create_engine
        from rlsd_megatron.trainer.reference import KLReference

        self.cfg = cfg
        # The launcher installs it before building the trainer, so that a stop signal during
        # start-up (minutes at 70B) is kept, not fatal; `run()` installs it otherwise.
        self.stop = stop if stop is not None else StopController.from_environment()
        self.replica_group = replica_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.dp_rank, self.dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
        self.hosts_engine = dist.get_rank(self.replica_group) == 0
        # Inputs first: a bad data row or a missing checkpoint stops every rank here, in seconds,
        # not after the model (minutes per rank at 70B) and the engine are built.
        self.dataset, val_dataset = same_on_every_rank(lambda: build_run_datasets(cfg), DataError)
        resume = resolve_resume(cfg.checkpoint.resume, cfg.checkpoint.dir)
        self.engine = self.scorer = self.benchmarks = None
        self.learner = Learner(cfg, impl=impl)
        # The frozen scorers before the engine, which sizes its KV cache by the memory still free.
        self.teacher_model = FrozenModel(cfg, cfg.algorithm.teacher_model, setting="algorithm.teacher_model",
                                         impl=impl) if cfg.algorithm.teacher_weights == "separate" else None
        self.reference = KLReference(cfg, self.learner, impl=impl) if cfg.algorithm.kl_coef else None
        try:
            # The engine takes engine_tp GPUs from the host's own: its replica's first GPUs.
            first_gpu = torch.cuda.current_device() if torch.cuda.is_available() else 0
            self.engine = create_engine(cfg, base_gpu_id=first_gpu) if self.hosts_engine else None
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
            self.mismatch = MismatchMonitor(cfg.rollout.max_logprob_mismatch)
            self.logger = MetricsLogger(cfg.logging, total_steps=cfg.train.steps,
                                        enabled=dist.get_rank() == dist.get_world_size() - 1)
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
                load_training_state(self, resume)
                self._saved_step = self.step
                self.logger.message(f"resumed from {resume} at step {self.step}")
            elif cfg.checkpoint.init_from:
                from rlsd_megatron.checkpoint import load_checkpoint

                load_checkpoint(cfg.checkpoint.init_from, self.learner.model, model=cfg.model)
                self.learner.optimizer.reload_model_params()
                self.start_from_learner_weights()
        except BaseException:
            self.close()  # the engine and the verifier processes, when start-up fails after them
            raise

    # ------------------------------------------------------------------------------------------
    def run(self) -> None:
        installed_here = not self.stop.installed
        if installed_here:
            self.stop.install()
        try:
            self._run_steps()
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
            _fault_injection_point(self.step)
            if last or _every(self.step, self.cfg.checkpoint.save_interval):
                self.save()
        if reason is None:
            where = f"; checkpoints in {self.cfg.checkpoint.dir}" if self.cfg.checkpoint.dir else ""
            self.logger.message(f"done: {self.step} steps; logs in {self.cfg.logging.dir} (tensorboard --logdir "
                                f"{self.cfg.logging.dir}){where}")
            return
        if self._saved_step != self.step:
            self.save()
        if dist.get_rank() == 0:
            report_stop(reason)
        saved = "checkpoint saved" if self.cfg.checkpoint.dir else "no checkpoint.dir, nothing saved"
        why = "too little time left in the job for another step" if reason == "time" else f"stopped by {reason}"
        self.logger.message(f"{why} after step {self.step}; {saved}")

    def save(self) -> None:
        """A training-state checkpoint of this step under `checkpoint.dir` (if set)."""
        ckpt = self.cfg.checkpoint
        if ckpt.dir is None:
            return
        started = time.perf_counter()
        path = save_training_state(self, ckpt.dir)
        if dist.get_rank() == 0:
            prune_checkpoints(ckpt.dir, keep_last=ckpt.keep_last)
        self._last_save_seconds = time.perf_counter() - started
        self.stop.record_save(self._last_save_seconds)
        self._saved_step = self.step
        self.logger.message(f"saved {path} ({self._last_save_seconds:.1f} s)")

    def _step_start(self) -> dict:
        """What generation changes before anything is trained: enough to rewind the step."""
        return {"loader": self.loader.state_dict(), "draws": self._draws, "rng": rng_state()}

    def _rewind(self, start: dict) -> None:
        self.loader.load_state_dict(start["loader"])
        self._draws = start["draws"]
        set_rng_state(start["rng"])
        self.step -= 1

    def start_from_learner_weights(self) -> None:
        """The learner's weights are the policy RL starts from (after a warm start or
        `checkpoint.init_from`): the teacher copy and the KL reference copy are taken from them."""
        self.teacher.initialize(self.learner.local_weights())
        if self.reference is not None:
            self.reference.restart()

    def warm_start(self) -> None:
        """Supervised warm start (`warm_start` config), then RL starts from its weights."""
        from rlsd_megatron.data.loader import PromptLoader
        from rlsd_megatron.trainer.warm_start import run_warm_start

        loader = PromptLoader(self.dataset, global_batch_size=self.cfg.warm_start.prompts_per_step,
                              dp_rank=self.dp_rank, dp_size=self.dp_size, seed=self.cfg.train.seed + 1)
        full = run_warm_start(self.cfg, self.dataset, self.val_rows, loader, self.logger, impl=self.learner.impl)
        self.learner.load_full_state(full)
        self.start_from_learner_weights()
        if self.cfg.warm_start.output:
            from rlsd_megatron.checkpoint import save_checkpoint

            path = save_checkpoint(self.cfg.warm_start.output, self.learner.model, self.cfg, iteration=0, release=True)
            self.logger.message(f"saved the warm-started weights to {path}")

    def train_step(self) -> dict[str, float]:
        cfg, timer = self.cfg, PhaseTimer()
        with timer("generate"):
            start = self._step_start()
            rollouts = self.collect_rollouts()
            if self.engine is not None:  # colocated: the learner's phases need the engine's GPU memory
                self.engine.sleep()
        # A safe point: a stop signal that arrived during generation (the longest phase) is honoured
        # now rather than after the update, by rewinding the step: its checkpoint is the previous one.
        reason = agreed_stop_reason(self.stop, include_time=False)
        if reason is not None:
            self._rewind(start)
            raise StepAbandoned(reason)
        with timer("score"):
            sequences, masks = rollouts.sequences(), rollouts.response_mask()
            student = self.log_probs(sequences)
            reference = self.reference.outputs(sequences, self._log_prob_fn)["logp"] \
                if self.reference is not None else None
            prompt_lengths = [len(rollouts.row_of(i).prompt_ids) for i in range(len(sequences))]
            student_resp = [lp[n:] for lp, n in zip(student, prompt_lengths)]
            resp_mask = response_tensors([[1.0] * len(r) for r in rollouts.responses]).bool()
            contexts = self.teacher_contexts(rollouts) if objectives.uses_teacher_log_probs(cfg.algorithm) or \
                objectives.uses_distillation(cfg.algorithm) else None
            teacher_resp = self.teacher_outputs(contexts, self._log_prob_fn)["logp"] \
                if objectives.uses_teacher_log_probs(cfg.algorithm) else None
            seq_adv = objectives.sequence_advantages(cfg, rollouts.rewards)
            advantages = objectives.token_advantages(
                cfg.algorithm, self.step, seq_adv, resp_mask, response_tensors(student_resp, resp_mask.shape[1]),
                response_tensors(teacher_resp, resp_mask.shape[1]) if teacher_resp is not None else None,
                teacher_mask=torch.tensor([c.has_teacher for c in contexts]) if contexts is not None else None)
            mismatch = self.mismatch.check(response_tensors(student_resp), response_tensors(rollouts.engine_log_probs),
                                           resp_mask, group=self.dp_group, version=self.step - 1)
        with timer("train"):
            fields = {
                "old_logp": student,
                "loss_mask": masks,
                "advantages": [torch.cat([torch.zeros(n), adv[: len(r)]])
                               for n, adv, r in zip(prompt_lengths, advantages.values, rollouts.responses)],
            }
            if reference is not None:
                fields["ref_logp"] = reference
            if cfg.algorithm.tis_cap:
                tis = alg.tis_weights(response_tensors(student_resp), response_tensors(rollouts.engine_log_probs),
                                      resp_mask, cap=cfg.algorithm.tis_cap)
                fields["tis_weight"] = [torch.cat([torch.zeros(n), w[: len(r)]])
                                        for n, w, r in zip(prompt_lengths, tis, rollouts.responses)]
            teacher = None
            if objectives.uses_distillation(cfg.algorithm):
                fields["distill_mask"] = [m * float(c.has_teacher) for m, c in zip(masks, contexts)]
                updates = cfg.train.ppo_epochs * cfg.train.optimizer_steps_per_batch
                teacher = distillation.TeacherInputs(contexts, prompt_lengths, distillation.teacher_weights_for_update(
                    self.teacher.teacher_state(), self.learner, updates))
            train_stats = self.update(sequences, fields, teacher)
            self.teacher.on_step(self.step, self.learner.local_weights())
        with timer("sync"):
            sync = self.sync_weights()
        tokens = sum(len(s) for s in sequences)
        metrics = {
            **rollouts.reward_metrics,
            "rollout/response_length": float(sum(len(r) for r in rollouts.responses) / max(len(rollouts.responses), 1)),
            "rollout/truncated_frac": sum(f == "length" for f in rollouts.finish_reasons) / max(len(rollouts.responses), 1),
            **mismatch.metrics(),
            **advantages.metrics,
            **{f"train/{k}": v for k, v in train_stats.items()},
            **sync.metrics(),
            **{f"perf/{k}_seconds": v for k, v in timer.seconds.items()},
            "perf/tokens_per_s": tokens / max(sum(timer.seconds.values()), 1e-9),
        }
        return self.reduce_over_data_parallel(metrics)

    # ------------------------------------------------------------------------------------------
    def collect_rollouts(self) -> Rollouts:
        """This rank's G responses for each of its prompts (refilled under dynamic sampling)."""
        from rlsd_megatron.rollout.provider import sampling_params

        cfg = self.cfg
        want = cfg.train.prompts_per_step // self.dp_size
        parts: list[Rollouts] = []
        kept = 0
        rounds = cfg.algorithm.dynamic_sampling_max_rounds if cfg.algorithm.dynamic_sampling else 1
        for _ in range(rounds):
            rows = self.loader.next_batch()
            sampling = sampling_params(cfg.rollout, stop_token_ids=[self.dataset.eos_id],
                                       seed=cfg.train.seed * 1_000_003 + self._draws)
            self._draws += 1
            batch = generate_and_score(rows, self.dataset, self.engine, sampling, self.scorer,
                                       group=self.replica_group, prompt_offset=self.dp_rank * len(rows))
            if cfg.algorithm.dynamic_sampling:
                batch = batch.select_groups(alg.dynamic_sampling_keep_mask(batch.rewards, cfg.rollout.n))
            parts.append(batch)
            kept += len(batch.rows)
            if kept >= want:
                break
        rollouts = Rollouts.concat(parts)
        if cfg.algorithm.dynamic_sampling:
            keep = torch.arange(len(rollouts.rows)) < want
            rollouts = rollouts.select_groups(keep)
            rollouts.reward_metrics = {**rollouts.reward_metrics, "rollout/kept_prompt_frac": kept / (want * len(parts))}
        return rollouts

    def _log_prob_fn(self, logits: torch.Tensor, mb) -> dict[str, torch.Tensor]:
        from rlsd_megatron.ops import token_log_probs

        return {"logp": token_log_probs(logits, mb.targets.to(logits.device), temperature=self.cfg.rollout.temperature,
                                        vocab_size=self.cfg.model.vocab_size)}

    def log_probs(self, sequences: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-token log-probs under the learner's current weights (aligned with tokens)."""
        return self.learner.forward_sequences(sequences, self._log_prob_fn)["logp"]

    def teacher_contexts(self, rollouts: Rollouts) -> list:
        """The teacher's input for each response: the privileged hint (dataset answer or
        reference solution) in the user turn, for SDPO a successful sibling's response, for OPD
        (a separate teacher model) the student's own prompt."""
        a = self.cfg.algorithm
        if a.method == "opd":
            return [alg.TeacherSequence(rollouts.row_of(i).prompt_ids + response, len(rollouts.row_of(i).prompt_ids),
                                        len(response))
                    for i, response in enumerate(rollouts.responses)]
        if a.method == "sdpo":
            demos = alg.select_sdpo_demonstrations(rollouts.rewards, rollouts.group_size,
                                                   success_threshold=a.sdpo_success_threshold)
            return [self.dataset.teacher_context.build_sdpo(
                        rollouts.row_of(i).question, response,
                        solution=self.dataset.decode(rollouts.responses[d]) if d is not None else None)
                    for i, (response, d) in enumerate(zip(rollouts.responses, demos))]
        return [self.dataset.teacher_context.build(rollouts.row_of(i).question, rollouts.row_of(i).answer, response,
                                                   reference_solution=rollouts.row_of(i).reference_solution)
                for i, response in enumerate(rollouts.responses)]

    def teacher_outputs(self, contexts: list, per_token) -> dict[str, list[torch.Tensor]]:
        """`per_token` outputs on the teacher contexts, with the teacher policy's weights (or
        the separate teacher model), restricted to the response tokens."""
        weights = self.teacher.teacher_state()
        scope = self.learner.use_weights(weights) if weights is not None else contextlib.nullcontext()
        scorer = self.teacher_model if self.teacher_model is not None else self.learner
        with scope:
            full = scorer.forward_sequences([torch.tensor(c.input_ids) for c in contexts], per_token)
        return {name: [v[c.response_start: c.response_start + c.response_length] for v, c in zip(values, contexts)]
                for name, values in full.items()}

    def update(self, sequences: list[torch.Tensor], fields: dict[str, list[torch.Tensor]],
               teacher: distillation.TeacherInputs | None = None) -> dict[str, float]:
        """`ppo_epochs` × `optimizer_steps_per_batch` optimizer steps over this rank's rollouts
        (trainer/update.py)."""
        return update_policy(self.learner, self.cfg, sequences, fields, teacher, dp_group=self.dp_group)

    def sync_weights(self):
        """Learner weights → this replica's engine; every rank returns the host's `SyncStats` (the
        ranks that log hold no engine)."""
        from rlsd_megatron.rollout.weight_sync import sync_weights

        stats = None
        if self.learner.cp_rank == 0:  # other CP ranks' model-parallel groups hold no engine (replica_group)
            if self.engine is not None:  # weights first, KV cache after the sync: a lower peak
                self.engine.wake(["weights"])
            stats = sync_weights(self.learner.model, self.cfg.model, self.engine, version=self.step,
                                 bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 2**20)
            if self.engine is not None:
                self.engine.wake()
        holder = [stats]
        if dist.get_world_size(self.replica_group) > 1:
            dist.broadcast_object_list(holder, src=dist.get_global_rank(self.replica_group, 0), group=self.replica_group)
        return holder[0]

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
        if self.engine is not None:
            self.engine.shutdown()
        if getattr(self, "logger", None) is not None:  # None when start-up failed before it
            self.logger.close()
