"""End to end on CPU: a 2-step trainer run on 2 data-parallel gloo ranks, with ``train.eval_sets``,
writes a checkpoint, and ``python -m rlsd_megatron.eval`` evaluates it on the built-in
reversed-addition benchmark files (checkpoints of other TP/PP layouts load through the same
``checkpoint.streaming`` reader, tested at TP/PP in tests/checkpoint and tests/tools).

Independent references: the checkpoint exported by ``tools/convert_megatron_to_hf.py`` and run
by plain ``transformers`` with a hand-written greedy loop (full forward per token, no KV cache, the
task's prompt format written out here) gives the greedy responses, and the benchmark's first rows
take those responses as their gold answers, so avg@1 is known before the evaluation runs. Every
metric of both benchmarks is recomputed from the per-sample JSON with exact binomials and a
Counter vote. The metrics the trainer logged for ``train.eval_sets`` at step 2 equal rlsd-eval's
on the step-2 checkpoint. (Resume is tested with a scripted engine in test_runner.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HELD_OUT = ROOT / "examples/benchmarks/reversed_addition/heldout_3digit.jsonl"
MAX_NEW_TOKENS = 6


def train_two_steps(ckpt: str, eval_sets: str) -> list[tuple[int, dict]]:
    """Two RL steps of the tiny test config on 2 data-parallel ranks with ``train.eval_sets``;
    returns what the trainer logged."""
    from rlsd_megatron.config import load_config
    from rlsd_megatron.parallel.state import model_parallel
    from rlsd_megatron.trainer.trainer import Trainer
    from tests.trainer.test_resume import TINY

    cfg = load_config("examples/configs/cpu_demo.yaml", [
        *TINY, "train.steps=2", "checkpoint.save_interval=2", "train.eval_interval=2", f"train.eval_sets={eval_sets}",
        f"checkpoint.dir={ckpt}", f"logging.dir={ckpt}/logs", "logging.progress_bar=false"])
    logged = []
    with model_parallel(seed=cfg.train.seed):
        trainer = Trainer(cfg)
        log = trainer.logger.log
        trainer.logger.log = lambda step, metrics: (logged.append((step, dict(metrics))), log(step, metrics))
        try:
            trainer.run()
        finally:
            trainer.close()
    return logged


def greedy_reference(hf_dir: Path, questions: list[str]) -> list[str]:
    """Greedy responses of the exported HF model: prompt ``<bos>`` + question + ``=``, one full
    forward per new token, stop at ``<eos>`` or MAX_NEW_TOKENS; the text drops ``<bos>`` / ``<pad>``
    as the task's decoding does."""
    from transformers import AutoModelForCausalLM

    from rlsd_megatron.data.reversed_addition import TOKENS

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids_of = {t: i for i, t in enumerate(TOKENS)}
    responses = []
    for question in questions:
        ids = [ids_of["<bos>"], *(ids_of[c] for c in question + "=")]
        out = []
        with torch.no_grad():
            for _ in range(MAX_NEW_TOKENS):
                token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
                if token == ids_of["<eos>"]:
                    break
                out.append(token)
        responses.append("".join(TOKENS[t] for t in out if TOKENS[t] not in ("<pad>", "<bos>")))  # text only
    return responses


def recomputed(samples: list[dict], n: int, ks: list[int]) -> dict[str, float]:
    problems = [samples[i:i + n] for i in range(0, len(samples), n)]
    out = {f"avg@{n}": sum(s["score"] for s in samples) / len(samples)}
    for k in ks:
        total = Fraction(0)
        for p in problems:
            c = sum(int(s["score"]) for s in p)
            total += 1 - Fraction(comb(n - c, k), comb(n, k))
        out[f"pass@{k}"] = float(total / len(problems))
    majority = 0
    for p in problems:
        votes = Counter(s["extracted"] for s in p if s["extracted"] is not None)
        if votes:
            top = max(votes.values())
            winner = next(s for s in p if votes.get(s["extracted"]) == top)  # the first answer among the tied
            majority += winner["score"]
    out[f"maj@{n}"] = majority / len(problems)
    out["mean_response_tokens"] = sum(s["tokens"] for s in samples) / len(samples)
    out["truncation_rate"] = sum(s["finish_reason"] == "length" for s in samples) / len(samples)
    out["problems"], out["samples"] = len(problems), len(samples)
    return out


def run_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlsd_megatron.eval", *args, "--no-progress"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_evaluates_a_trainer_checkpoint_and_the_numbers_recompute(dist_pool, tmp_path):
    ckpt = tmp_path / "ckpt"
    (tmp_path / "during.yaml").write_text(
        f"- {{name: heldout, file: {HELD_OUT}, n: 2, temperature: 1.0, max_new_tokens: {MAX_NEW_TOKENS}, "
        "answer_type: exact, pass_k: [1, 2], seed: 5, limit: 6}\n")
    logs = dist_pool(2).run(train_two_steps, str(ckpt), str(tmp_path / "during.yaml"))
    assert (ckpt / "iter_0000002").is_dir()
    # train.eval_sets: each DP rank sampled 3 of the 6 problems; both ranks computed the same metrics.
    during = [{k.removeprefix("eval/heldout/"): v for k, v in metrics.items() if k.startswith("eval/")}
              for rank_log in logs for step, metrics in rank_log if step == 2]
    assert during[0] == during[1] and set(during[0]) == {"avg@2", "pass@1", "pass@2", "maj@2",
                                                         "mean_response_tokens", "truncation_rate"}
    hf_dir = tmp_path / "hf"
    export = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out",
                             str(hf_dir), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]

    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()[:8]]
    reference = greedy_reference(hf_dir, [r["question"] for r in rows])
    # Rows 0-3 take the model's own greedy answer as gold (where it gave one), so avg@1 is known.
    for row, answer in zip(rows[:4], reference[:4]):
        row["answer"] = answer or row["answer"]
    expected_right = sum(r["answer"] == ref for r, ref in zip(rows, reference))
    assert expected_right >= 1  # the check below is not vacuous
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.yaml").write_text(
        "- {name: greedy, file: bench.jsonl, n: 1, temperature: 0, max_new_tokens: %d, answer_type: exact}\n"
        "- {name: sampled, file: bench.jsonl, n: 4, temperature: 1.0, max_new_tokens: %d, answer_type: exact,\n"
        "   pass_k: [1, 2, 4], seed: 3}\n" % (MAX_NEW_TOKENS, MAX_NEW_TOKENS))

    out = tmp_path / "eval"
    first = run_eval("--model", str(ckpt), "--benchmarks", str(tmp_path / "bench.yaml"), "--out", str(out))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| greedy | 8 | 1 |" in first.stdout and "| sampled | 8 | 4 |" in first.stdout

    greedy = json.loads((out / "greedy.json").read_text())
    assert [s["response"] for s in greedy["samples"]] == reference
    assert greedy["metrics"]["avg@1"] == pytest.approx(expected_right / 8, abs=1e-12)
    summary = json.loads((out / "summary.json").read_text())["benchmarks"]
    for name, n, ks in (("greedy", 1, [1]), ("sampled", 4, [1, 2, 4])):
        result = json.loads((out / f"{name}.json").read_text())
        for s in result["samples"]:  # the exact answer type, by hand: the whole response is the answer
            assert s["score"] == float(s["response"] == s["answer"])
        want = recomputed(result["samples"], n, ks)
        assert result["metrics"] == pytest.approx(want, abs=1e-12)
        assert summary[name] == result["metrics"]

    # The same benchmark evaluated from the step-2 checkpoint by rlsd-eval: the same samples (per-problem
    # seeds; same weights, engine and prompt length), so the same numbers as the trainer logged.
    after = run_eval("--model", str(ckpt), "--benchmarks", str(tmp_path / "during.yaml"), "--out", str(tmp_path / "e2"))
    assert after.returncode == 0, after.stderr[-3000:]
    standalone = json.loads((tmp_path / "e2" / "heldout.json").read_text())["metrics"]
    assert {k: v for k, v in standalone.items() if k not in ("problems", "samples")} == during[0]



def test_input_problems_exit_2_before_loading_a_model(tmp_path):
    (tmp_path / "bench.yaml").write_text("- {name: x, file: missing.jsonl}\n")
    result = run_eval("--model", str(tmp_path / "nope"), "--benchmarks", str(tmp_path / "bench.yaml"),
                      "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"rlsd-eval: error: checkpoint path {tmp_path / 'nope'} does not exist. "
                                    "rlsd-eval --model takes a Megatron checkpoint")


def test_counts_below_one_are_usage_errors(tmp_path, capsys):
    from rlsd_megatron.eval.cli import main

    # --chunk-prompts 0 was a bare "range() arg 3 must not be zero" from the runner.
    assert main(["--model", str(tmp_path), "--benchmarks", "b.yaml", "--out", str(tmp_path), "--chunk-prompts", "0"]) == 2
    assert capsys.readouterr().err == ("rlsd-eval: error: --engines 1, --engine-tp 1 and --chunk-prompts 0 must be "
                                       ">= 1.\n")


def test_an_hf_directory_with_its_chat_template_and_system_prompt(tmp_path):
    """An HF directory (weights + chat tokenizer): the prompt is the chat template's rendering of the
    system prompt and the user turn; greedy answers equal transformers' own ``generate``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlsd_megatron.config import ModelConfig
    from tests.data.conftest import build_tokenizer
    from tests.hf_models import random_hf_model

    model = ModelConfig(family="qwen2", vocab_size=320, hidden_size=32, num_layers=2, num_attention_heads=4,
                        num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=256, qkv_bias=True)
    hf_dir = build_tokenizer(tmp_path / "hf")
    random_hf_model(model, seed=1).save_pretrained(hf_dir, safe_serialization=True)
    questions = ["What is 1+1?", "Solve x^2 = 4 for x > 0."]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in questions))
    (tmp_path / "b.yaml").write_text("- {name: q, file: q.jsonl, max_new_tokens: 5, answer_type: exact, "
                                     "system_prompt: Be brief., prompt_template: 'Q: {question}'}\n")
    run = run_eval("--model", str(hf_dir), "--benchmarks", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "out"))
    assert run.returncode == 0, run.stderr[-3000:]
    got = [s["response"] for s in json.loads((tmp_path / "out" / "q.json").read_text())["samples"]]

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    want = []
    for q in questions:
        text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"Q: {q}"}],
                                             tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        out = reference.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        want.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    assert got == want and all(got)  # measured: 5 tokens each, no early end-of-sequence
