"""Benchmarks during training (``train.eval_sets``): the ``rlsd-eval`` benchmarks of a YAML file,
evaluated by the trainer's own engines every ``train.eval_interval`` steps and after the last,
logged per benchmark as ``eval/<name>/avg@n``, ``eval/<name>/pass@k``, ``eval/<name>/maj@n``,
``eval/<name>/mean_response_tokens`` and ``eval/<name>/truncation_rate``.

Each data-parallel replica evaluates a contiguous share of every benchmark's problems on its
engine (problems keep their benchmark-wide index and seed, so the samples are those ``rlsd-eval``
draws for the same weights), the replica's engine host broadcasts its records to the replica, and
the records are gathered over data-parallel ranks so that every rank computes the same metrics.
Prompts are rendered by the training dataset's renderer (its tokenizer, chat template and system
prompt, or the built-in task's format); a benchmark's ``prompt_template`` shapes the user turn. A
vision-language run on data files evaluates image benchmarks too, with the training data's
processor settings; a text run refuses them at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

from rlsd_megatron.data.prompts import FilePromptDataset
from rlsd_megatron.eval.benchmarks import load_benchmark_specs, read_benchmark_rows
from rlsd_megatron.eval.grading import ResponseGrader
from rlsd_megatron.eval.model_source import Prompter
from rlsd_megatron.eval.runner import generate_samples, metrics_from_samples
from rlsd_megatron.parallel.state import wait_for_every_rank

if TYPE_CHECKING:
    from rlsd_megatron.config import Config, TrainConfig
    from rlsd_megatron.data.prompts import PromptDataset
    from rlsd_megatron.rollout.engine import RolloutEngine

__all__ = ["TrainingBenchmarks", "eval_sets_problems", "training_benchmarks"]

_COUNTS = ("problems", "samples")  # constant over a run: not logged


class TrainingBenchmarks:
    """The benchmarks of ``path`` for a training run on ``dataset``. ``hosts_engine``: this rank
    holds its replica's engine (and grades). Raises ValueError / DataError for a bad file at
    construction, before training starts."""

    def __init__(self, path: str, dataset: "PromptDataset", *, dp_rank: int, dp_size: int, hosts_engine: bool):
        self.specs = _load_specs(path)
        # A vision-language run's file dataset renders <image> placeholders: its image benchmarks
        # are evaluated with the model's processor settings (data.tokenizer_dir), like its rows.
        vision = dataset.vision if isinstance(dataset, FilePromptDataset) else None
        self.prompter = Prompter(dataset.render_prompt, dataset.decode, [dataset.eos_id], vision=vision,
                                 processor_dir=dataset.cfg.tokenizer_dir if vision is not None else None)
        self.rows = {spec.name: read_benchmark_rows(spec, self.prompter.image_reader(spec)) for spec in self.specs}
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.grader = ResponseGrader() if hosts_engine else None

    def evaluate(self, engine: "RolloutEngine | None", dp_group, replica_group) -> dict[str, float]:
        """Every benchmark's metrics as ``eval/<name>/<metric>``; collective over the world
        (``engine`` is None on ranks that host none)."""
        metrics: dict[str, float] = {}
        for spec in self.specs:
            rows = self.rows[spec.name]
            start = len(rows) * self.dp_rank // self.dp_size
            stop = len(rows) * (self.dp_rank + 1) // self.dp_size
            holder = [generate_samples(spec, rows[start:stop], engine, self.prompter, self.grader, index_offset=start,
                                       progress=False) if engine is not None else None]
            if dist.get_world_size(replica_group) > 1:
                dist.broadcast_object_list(holder, src=dist.get_global_rank(replica_group, 0), group=replica_group)
            wait_for_every_rank(f"generating benchmark {spec.name!r}")  # then the gather runs on the short timeout
            shares = [None] * dist.get_world_size(dp_group)
            dist.all_gather_object(shares, holder[0], group=dp_group)
            samples = [record for share in shares for record in share]  # DP rank order = problem order
            for key, value in metrics_from_samples(samples, spec.n, spec.pass_k).items():
                if key not in _COUNTS:
                    metrics[f"eval/{spec.name}/{key}"] = value
        return metrics

    def close(self) -> None:
        """Stop the grader's verifier workers, if any."""
        if self.grader is not None:
            self.grader.close()


def training_benchmarks(train: "TrainConfig", dataset: "PromptDataset", dp_rank: int, dp_size: int,
                        hosts_engine: bool) -> TrainingBenchmarks | None:
    """The run's ``train.eval_sets`` benchmarks, or None when it names none."""
    if not train.eval_sets:
        return None
    return TrainingBenchmarks(train.eval_sets, dataset, dp_rank=dp_rank, dp_size=dp_size, hosts_engine=hosts_engine)


def eval_sets_problems(cfg: "Config") -> list[str]:
    """What is wrong with ``train.eval_sets`` (the YAML, its settings, every benchmark row and
    image: an image benchmark of a run whose prompts take none), checked by the trainer's input
    checks before the model is built; [] when it is fine or unset."""
    path = cfg.train.eval_sets
    if not path:
        return []
    from rlsd_megatron.data.readers import DataError

    # As `TrainingBenchmarks`: a VL run on data files renders images, with the model's processor.
    vision = cfg.model.vision if cfg.data.task is None else None
    prompter = Prompter(None, None, [], vision=vision, processor_dir=cfg.data.tokenizer_dir if vision else None)
    try:
        for spec in _load_specs(path):
            read_benchmark_rows(spec, prompter.image_reader(spec))
    except (OSError, ValueError, DataError) as exc:
        return [f"train.eval_sets={path!r}: {exc}"]
    return []


def _load_specs(path: str) -> list:
    specs = load_benchmark_specs(path)
    with_system = [s.name for s in specs if s.system_prompt]
    if with_system:
        raise ValueError(f"benchmarks {with_system} set system_prompt; during training prompts use the training "
                         "data's renderer (data settings), so remove it.")
    return specs
