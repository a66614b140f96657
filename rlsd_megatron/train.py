"""`rlsd-train` / `python -m rlsd_megatron.train`: the RL post-training entry point.

    torchrun --nproc-per-node 2 -m rlsd_megatron.train --config examples/configs/cpu_demo.yaml
    torchrun --nproc-per-node 8 -m rlsd_megatron.train --config examples/configs/rlsd.yaml \\
        model.hf_config=/ckpt/Qwen3-8B data.train_files=[train.parquet] data.tokenizer_dir=/ckpt/Qwen3-8B

Before any model is built, every rank loads the config and checks it (layout, algorithm,
hardware) and the inputs it names (data files, tokenizer directory, the checkpoint to resume or
start from, OPD's teacher model and a KL reference checkpoint, a custom reward function), then on
GPUs the memory plan; the ranks then agree, and a problem on any of them stops all of them.
Every rank then runs the same `Trainer`, which reads and checks every data row before it builds
the model.

Bad input (the error classes of `user_error_types`) is reported once, by global rank 0, as
`rlsd-train: error: ...` lines on stderr, and every rank exits with status 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

PROG = "rlsd-train"
USER_ERROR_STATUS = 2
# How long a rank that hit bad input after start-up waits for the others to report theirs
# before it prints its own (they may not have hit it: then they wait in a collective).
LATE_REPORT_TIMEOUT = datetime.timedelta(seconds=60)


def user_error_types() -> tuple[type[Exception], ...]:
    """The exceptions that mean the input is wrong, not the code: the config, the data, a
    checkpoint (missing, incomplete, another model's), the custom reward function."""
    from rlsd_megatron.checkpoint.directory import CheckpointError
    from rlsd_megatron.config import ConfigError
    from rlsd_megatron.data.readers import DataError
    from rlsd_megatron.rewards.custom import RewardFunctionError

    return ConfigError, DataError, CheckpointError, RewardFunctionError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors (the same on every rank) from global rank 0 only."""
        from rlsd_megatron.parallel.state import launch_rank

        if launch_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


def checkpoint_problems(cfg) -> list[str]:
    """The checkpoint the trainer would load (`checkpoint.resume`, else `checkpoint.init_from`):
    it exists, is a complete checkpoint, and was written for `cfg.model`. Reads metadata only."""
    from rlsd_megatron.checkpoint import CheckpointError, read_checkpoint_info, resolve_checkpoint_dir
    from rlsd_megatron.checkpoint.directory import INFO_FILE, check_model_matches
    from rlsd_megatron.trainer.training_state import resolve_resume

    try:
        key, path = resolve_resume(cfg.checkpoint) or (None, None)
    except CheckpointError as exc:  # resume=auto without a readable checkpoint.dir
        return [str(exc)]
    if key is None and cfg.checkpoint.init_from:
        key, path = f"checkpoint.init_from={cfg.checkpoint.init_from!r}", cfg.checkpoint.init_from
    if key is None:
        return []
    if not Path(path).exists():
        return [f"{key} does not exist; point it at a checkpoint written by tools/convert_hf_to_megatron.py or by "
                "the trainer (a checkpoint.dir root or one of its iter_* directories)"]
    try:
        directory = resolve_checkpoint_dir(path)
        if (directory / INFO_FILE).is_file():
            check_model_matches(read_checkpoint_info(directory), cfg.model, directory)
    except (CheckpointError, OSError, ValueError) as exc:  # ValueError: unreadable rlsd_checkpoint.json
        return [f"{key}: {exc}"]
    return []


def input_problems(cfg) -> list[str]:
    """Bad inputs that are cheap to see before the model is built: no model named for a prompt
    dataset, data files and tokenizer directory, the checkpoint to resume or start from, the
    train.eval_sets benchmarks, the frozen models to load (OPD's teacher, a KL reference), the custom reward function."""
    from rlsd_megatron.data.build import data_input_problems
    from rlsd_megatron.eval.in_training import eval_sets_problems
    from rlsd_megatron.learner.frozen_model import frozen_model_inputs, frozen_model_problems
    from rlsd_megatron.plan import names_no_model
    from rlsd_megatron.rewards.custom import RewardFunctionError, load_reward_fn

    problems = []
    if names_no_model(cfg) and cfg.data.task is None:
        problems.append("the config names no model (no model.hf_config and no model.* shape fields), so this would "
                        "train the built-in placeholder on your prompts; set model.hf_config=/path/to/hf_model_dir "
                        "(and checkpoint.init_from=… for its weights)")
    problems += data_input_problems(cfg.data) + checkpoint_problems(cfg) + eval_sets_problems(cfg)
    for setting, path in frozen_model_inputs(cfg):
        problems += frozen_model_problems(cfg, path, setting)
    if cfg.reward.custom_fn:
        try:
            load_reward_fn(cfg.reward.custom_fn)
        except RewardFunctionError as exc:
            problems.append(str(exc))
    return problems


def _engine_rank_stops(failure, user_errors: tuple[type[Exception], ...], errors_group) -> int:
    """An engine rank's exit status when the learners failed (`failure`, a `PeerFailure`). Bad input
    is reported by the learners (`report_late_problem` over `errors_group`, rank 0 prints it): this
    rank joins that report with the same problem, so that it comes at once (rather than after the
    report's timeout) and reads as it does without engine ranks; a learner's bug has its traceback
    on the learner, and a line here."""
    import socket

    import torch.distributed as dist

    from rlsd_megatron.parallel.agreement import report_problems

    bad_input = failure.error_type in {f"{kind.__module__}.{kind.__qualname__}" for kind in user_errors}
    if bad_input:
        try:
            report_problems([failure.error], prog=PROG, group=errors_group)
            return USER_ERROR_STATUS
        except Exception:  # the gloo timeout: not every learner reports it
            pass
    print(f"{PROG}: error: rollout engine rank {dist.get_rank()} ({socket.gethostname()}) stops: {failure}",
          file=sys.stderr, flush=True)
    return USER_ERROR_STATUS if bad_input else 1


def main(argv: list[str] | None = None) -> int:
    from rlsd_megatron.config_help import HelpConfigAction

    parser = _Parser(prog=PROG, description="RL post-training with RLSD and its baselines")
    parser.add_argument("--config", required=True, help="YAML config (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2 optimizer.lr=1e-6")
    parser.add_argument("--help-config", action=HelpConfigAction, help="all config fields: type, default, meaning")
    args = parser.parse_intermixed_args(argv)
    from rlsd_megatron.trainer.stopping import StopController

    # First, so that a SLURM stop signal during start-up (minutes at 70B) is kept, not fatal.
    problems = []
    try:
        stop = StopController.from_environment()
    except ValueError as error:
        stop = StopController()
        problems.append(str(error))
    stop.install()

    from rlsd_megatron.logging.quiet import quiet_known_noise

    quiet_known_noise()
    import torch
    import torch.distributed as dist

    from rlsd_megatron.config import Config, ConfigError, load_config
    from rlsd_megatron.config_checks import (engine_ranks, resolve_transformer_impl, transformer_engine_available,
                                             validate_config)
    from rlsd_megatron.parallel.agreement import report_late_problem, report_problems
    from rlsd_megatron.parallel.state import Layout, destroy_model_parallel, init_distributed, initialize_model_parallel
    from rlsd_megatron.parallel.state import is_engine_rank, new_group

    user_errors = user_error_types()
    cuda = torch.cuda.is_available()
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:  # reported below, once, when the ranks have agreed
        problems.append(str(error))
    if cuda and cfg is not None and cfg.parallel.bind_cpus:  # before the threads of the groups start
        from rlsd_megatron.parallel.cpu_binding import bind_rank_to_gpu_socket
        from rlsd_megatron.parallel.state import launch_local_rank

        bind_rank_to_gpu_socket(*launch_local_rank())
    created_world = not dist.is_initialized()
    init_distributed(timeout_minutes=(cfg or Config()).parallel.wait_timeout_minutes)
    world = dist.get_world_size()
    errors_group = new_group(backend="gloo", timeout=LATE_REPORT_TIMEOUT)

    def finish(status: int, *, layout: bool = False) -> int:
        stop.restore()
        if created_world:
            dist.destroy_process_group()
        elif layout:
            destroy_model_parallel()  # Megatron's groups and every other one, errors_group included
        else:
            dist.destroy_process_group(errors_group)
        return status

    if cfg is not None:
        try:
            validate_config(cfg, world)
        except ConfigError as error:
            problems.append(str(error))
        problems += input_problems(cfg)
        if cuda and not problems:  # the plan reads the frozen models' checkpoints and needs a valid layout
            from rlsd_megatron.plan import check_fits

            try:
                check_fits(cfg, world - engine_ranks(cfg))  # the learner's ranks
            except ConfigError as error:
                problems.append(str(error))
    if report_problems(problems, prog=PROG):
        return finish(USER_ERROR_STATUS)

    impl = resolve_transformer_impl(cfg, cuda_available=cuda, te_available=cuda and transformer_engine_available())
    p = cfg.parallel
    initialize_model_parallel(Layout(p.tp, p.pp, p.cp, p.vpp, p.ep), seed=cfg.train.seed,
                              collective_timeout_minutes=p.collective_timeout_minutes,
                              wait_timeout_minutes=p.wait_timeout_minutes, engine_ranks=engine_ranks(cfg))
    if is_engine_rank():  # rollout.placement=separate: serve the learner until it stops this rank
        from rlsd_megatron.rollout.separate import run_engine_rank
        from rlsd_megatron.rollout.separate_failures import PeerFailure

        try:
            run_engine_rank(cfg)
        except PeerFailure as failure:  # the learners failed: this rank stops now, with their error
            return finish(_engine_rank_stops(failure, user_errors, errors_group), layout=True)
        dist.barrier()
        return finish(0, layout=True)

    from rlsd_megatron.trainer.trainer import Trainer

    try:
        trainer = Trainer(cfg, impl=impl, stop=stop)
        try:
            trainer.run()
        except user_errors:
            trainer.close()
            raise
    except user_errors as error:
        report_late_problem(error, prog=PROG, group=errors_group)
        return finish(USER_ERROR_STATUS, layout=True)
    dist.barrier()
    return finish(0, layout=True)


if __name__ == "__main__":
    sys.exit(main())
