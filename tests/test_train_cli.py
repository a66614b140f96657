"""`rlsd-train`'s handling of bad input: one `rlsd-train: error: ...` report from global rank 0
(the other ranks exit with the same status, silently), exit status 2, no traceback; the cheap
checks (data files, tokenizer directory, the checkpoint to start from, the reward function) run
before the model is built, and data rows are checked before it too. Bugs keep their traceback.

`train.main` runs in the shared 2-rank gloo pool (in-process on each rank, stderr captured), and
once as `python -m rlsd_megatron.train` in a single process."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlsd_megatron import train
from rlsd_megatron.config import ModelConfig, load_config
from rlsd_megatron.parallel.agreement import format_report

ROOT = Path(__file__).resolve().parents[1]
DEMO = "examples/configs/cpu_demo.yaml"
MISSING_CKPT = ("rlsd-train: error: checkpoint.init_from='/nope/ckpt' does not exist; point it at a checkpoint "
                "written by tools/convert_hf_to_megatron.py or by the trainer (a checkpoint.dir root or one of its "
                "iter_* directories)")


def run_main(argv_by_rank: list[list[str]], *, bug: bool = False) -> dict:
    """`train.main` on this rank of the pool: its status, what it printed, whether a Learner was built."""
    import torch.distributed as dist

    from rlsd_megatron.learner.learner import Learner
    from rlsd_megatron.parallel.state import destroy_model_parallel

    built, original_init, original_problems = [], Learner.__init__, train.input_problems

    def spy(self, *args, **kwargs):
        built.append(True)
        return original_init(self, *args, **kwargs)

    def a_bug(cfg):
        raise ZeroDivisionError("a bug, not bad input")

    Learner.__init__ = spy
    if bug:
        train.input_problems = a_bug
    err, out = io.StringIO(), io.StringIO()
    result: dict = {}
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                result["status"] = train.main(argv_by_rank[dist.get_rank()])
            except SystemExit as exc:
                result["status"] = f"exit {exc.code}"
            except ZeroDivisionError as exc:
                result["status"] = f"raised {type(exc).__name__}"
                destroy_model_parallel()  # the groups main made before the bug stopped it
    finally:
        Learner.__init__, train.input_problems = original_init, original_problems
    return {**result, "stderr": err.getvalue(), "stdout": out.getvalue(), "learner_built": bool(built)}


def _on_every_rank_raising_on(rank_that_fails: int) -> str:
    import torch.distributed as dist

    from rlsd_megatron.data.readers import DataError
    from rlsd_megatron.parallel.agreement import same_on_every_rank

    def build():
        if dist.get_rank() == rank_that_fails:
            raise DataError("train.jsonl, line 3: the prompt is 99 tokens, over data.max_prompt_length=64")
        return "dataset"

    try:
        return same_on_every_rank(build, DataError)
    except DataError as exc:
        return f"DataError: {exc}"


def test_missing_init_checkpoint_is_reported_once_before_the_model_is_built(dist_pool):
    argv = ["--config", DEMO, "checkpoint.init_from=/nope/ckpt"]
    first, second = dist_pool(2).run(run_main, [argv, argv])
    assert first["stderr"] == MISSING_CKPT + "\n"
    assert second["stderr"] == "" and second["stdout"] == ""
    assert first["status"] == second["status"] == 2
    assert not first["learner_built"] and not second["learner_built"]


def test_config_errors_and_usage_errors_are_reported_once(dist_pool):
    pool = dist_pool(2)
    argv = ["--config", DEMO, "train.steps=abc", "algorithm.method=rlsd"]
    first, second = pool.run(run_main, [argv, argv])
    assert first["stderr"] == "rlsd-train: error: train.steps: expected int, got 'abc' (str)\n"
    assert second["stderr"] == "" and first["status"] == second["status"] == 2
    first, second = pool.run(run_main, [[DEMO], [DEMO]])  # no --config
    assert "rlsd-train: error: the following arguments are required: --config" in first["stderr"]
    assert second["stderr"] == "" and first["status"] == second["status"] == "exit 2"


def test_every_input_problem_at_once(dist_pool):
    argv = ["--config", DEMO, "data.task=null", "data.train_files=[/nope/train.parquet]", "parallel.tp=3"]
    first, second = dist_pool(2).run(run_main, [argv, argv])
    lines = first["stderr"].splitlines()
    assert lines[0] == "rlsd-train: error: invalid configuration:"
    assert "  - world size 2 is not divisible by tp*pp*cp=3*1*1=3; launch a multiple of 3 processes or change the layout" in lines
    assert ("rlsd-train: error: data.train_files[0]='/nope/train.parquet' does not exist; give the path of a .jsonl, "
            ".json or .parquet file that every node can read.") in lines
    assert ("rlsd-train: error: data.tokenizer_dir is not set; prompt files need a local tokenizer directory with a "
            "chat template (the model's HF directory works): set data.tokenizer_dir=DIR.") in lines
    assert second["stderr"] == "" and first["status"] == second["status"] == 2


def test_a_problem_on_some_ranks_names_them(dist_pool):
    good, bad = ["--config", DEMO], ["--config", DEMO, "checkpoint.init_from=/nope/ckpt"]
    first, second = dist_pool(2).run(run_main, [good, bad])
    prefix = f"rlsd-train: error: on rank 1 of 2 (host {socket.gethostname()}): "
    assert first["stderr"] == MISSING_CKPT.replace("rlsd-train: error: ", prefix) + "\n"
    assert second["stderr"] == "" and first["status"] == second["status"] == 2


def test_a_bad_data_row_stops_every_rank_before_the_model_is_built(dist_pool, tmp_path):
    from tests.data.conftest import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tokenizer")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"question": "What is 1+1? " * 40, "answer": "2"}) + "\n")
    argv = ["--config", DEMO, "data.task=null", "warm_start.max_steps=0", f"data.train_files=[{data}]",
            f"data.tokenizer_dir={tokenizer}", "data.max_prompt_length=64", "model.vocab_size=320",
            f"logging.dir={tmp_path / 'logs'}"]
    first, second = dist_pool(2).run(run_main, [argv, argv])
    assert first["stderr"].startswith(f"rlsd-train: error: {data}, line 1: the prompt is ")
    assert first["stderr"].endswith(" tokens, over data.max_prompt_length=64. Fix the row, or set data.bad_rows=skip "
                                    "to skip and count such rows.\n")
    assert len(first["stderr"].splitlines()) == 1
    assert second["stderr"] == "" and first["status"] == second["status"] == 2
    assert not first["learner_built"] and not second["learner_built"]


def test_bad_input_on_one_rank_stops_every_rank(dist_pool):
    first, second = dist_pool(2).run(_on_every_rank_raising_on, 1)
    assert first == second == ("DataError: train.jsonl, line 3: the prompt is 99 tokens, over "
                               "data.max_prompt_length=64 (rank 1 of 2)")


def test_a_bug_keeps_its_exception(dist_pool):
    argv = ["--config", DEMO]
    first, second = dist_pool(2).run(run_main, [argv, argv], bug=True)
    assert first["status"] == second["status"] == "raised ZeroDivisionError"
    assert first["stderr"] == "" and second["stderr"] == ""


def write_fake_checkpoint(root: Path, model: ModelConfig) -> Path:
    """The metadata of a converted checkpoint (what the checks read), without tensors."""
    release = root / "release"
    release.mkdir(parents=True)
    (release / "metadata.json").write_text("{}")
    (release / ".metadata").write_text("")
    info = {"model": dataclasses.asdict(model), "iteration": 0, "release": True, "format_version": 1}
    (release / "rlsd_checkpoint.json").write_text(json.dumps(info))
    (root / "latest_checkpointed_iteration.txt").write_text("release\n")
    return root


def test_checkpoint_checks(tmp_path):
    cfg = load_config(DEMO, [f"checkpoint.init_from={tmp_path / 'ckpt'}"])
    write_fake_checkpoint(tmp_path / "ckpt", cfg.model)
    assert train.checkpoint_problems(cfg) == []
    other = load_config(DEMO, [f"checkpoint.init_from={tmp_path / 'ckpt'}", "model.hidden_size=64"])
    (problem,) = train.checkpoint_problems(other)
    assert problem == (f"checkpoint.init_from='{tmp_path / 'ckpt'}': checkpoint {tmp_path / 'ckpt' / 'release'} was "
                       "written for a different model (hidden_size: checkpoint 128, model 64); load it into a model "
                       "with the same architecture (e.g. model.hf_config of the source)")
    (tmp_path / "empty").mkdir()
    (problem,) = train.checkpoint_problems(load_config(DEMO, [f"checkpoint.init_from={tmp_path / 'empty'}"]))
    assert problem.startswith(f"checkpoint.init_from='{tmp_path / 'empty'}': {tmp_path / 'empty'} is neither a "
                              "checkpoint directory")
    # resume=auto: nothing saved yet means init_from is what gets loaded; a saved one wins over it.
    run = tmp_path / "run"
    cfg = load_config(DEMO, ["checkpoint.resume=auto", f"checkpoint.dir={run}", "checkpoint.init_from=/nope/ckpt"])
    assert train.checkpoint_problems(cfg) == [MISSING_CKPT.removeprefix("rlsd-train: error: ")]
    write_fake_checkpoint(run, cfg.model)
    assert train.checkpoint_problems(cfg) == []
    assert train.checkpoint_problems(load_config(DEMO, ["checkpoint.resume=auto"])) == [
        "checkpoint.resume=auto needs checkpoint.dir (the root this run saves to and resumes from); set "
        "checkpoint.dir=DIR or unset checkpoint.resume"]


def test_input_checks_name_the_setting_and_the_value(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "train.csv").write_text("question,answer\n")
    cfg = load_config(DEMO, ["data.task=null", f"data.train_files=[{tmp_path / 'data'},{tmp_path / 'train.csv'}]",
                             f"data.tokenizer_dir={tmp_path / 'tokenizer'}", "reward.custom_fn=no_such_module:score"])
    assert train.input_problems(cfg) == [
        f"data.train_files[0]='{tmp_path / 'data'}' is a directory, not a file; list the files in it, e.g. "
        f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}].",
        f"data.train_files[1]='{tmp_path / 'train.csv'}' has suffix '.csv'; supported: ['.jsonl', '.json', '.parquet'] "
        "(convert it, e.g. with pandas.DataFrame.to_parquet).",
        f"data.tokenizer_dir='{tmp_path / 'tokenizer'}' is not a directory. Tokenizers are only loaded from a local "
        "directory, never from the hub: download it first, e.g. `huggingface-cli download ORG/MODEL --include "
        "'tokenizer*' --local-dir DIR`, and set data.tokenizer_dir=DIR.",
        "reward.custom_fn='no_such_module:score': cannot import module 'no_such_module' (ModuleNotFoundError: No "
        "module named 'no_such_module'); is its directory on PYTHONPATH (or the package installed)?",
    ]
    assert train.input_problems(load_config(DEMO)) == []  # the demo: a built-in task, nothing to load
    # A method preset that names no model, given prompt files: the placeholder would be trained on them.
    (tmp_path / "train.jsonl").write_text("")
    preset = load_config("examples/configs/rlsd.yaml", [f"data.train_files=[{tmp_path / 'train.jsonl'}]"])
    assert train.input_problems(preset)[0].startswith("the config names no model (no model.hf_config and no model.* "
                                                      "shape fields)")


def test_format_report_groups_ranks_and_hosts():
    reports = [("n1", ["a"]), ("n1", ["a"]), ("n2", ["a", "b"]), ("n2", ["a"]), ("n3", ["b"])]
    assert format_report(reports) == ["rlsd-train: error: on ranks 0-3 of 5 (hosts n1, n2): a",
                                            "rlsd-train: error: on ranks 2, 4 of 5 (hosts n2, n3): b"]
    assert format_report([("n1", ["a"]), ("n1", ["a"])]) == ["rlsd-train: error: a"]


def test_command_line_single_process(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlsd_megatron.train", "--config", DEMO,
                             "checkpoint.init_from=/nope/ckpt"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert result.stderr == MISSING_CKPT + "\n" and "Traceback" not in result.stdout
