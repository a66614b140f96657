"""The benchmark runner with a scripted engine: per-sample results and metrics, resume (finished
benchmarks are not redone, a changed setting or file is refused), the markdown table, the math
answer type through the verifier pool, and benchmark YAML / row checks."""

from __future__ import annotations

import json

import pytest

from rlsd_megatron.data.readers import DataError
from rlsd_megatron.eval.benchmarks import BenchmarkSpec, load_benchmark_specs, read_benchmark_rows
from rlsd_megatron.eval.grading import ResponseGrader
from rlsd_megatron.eval.model_source import Prompter
from rlsd_megatron.eval.runner import ResultMismatch, run_benchmarks
from rlsd_megatron.rollout.engine import Generation, RolloutEngine

EOS = 0


class ScriptedEngine(RolloutEngine):
    """Answers prompt text ``q`` with ``script[q][j]`` for sample j (EOS appended unless the text
    ends in ``~``, which stands for a cut at the token limit). Records the sampling it was given."""

    backend = "scripted"

    def __init__(self, script: dict[str, list[str]]):
        self.script, self.calls = script, []

    def generate(self, prompts, sampling, *, prompt_offset=0):
        self.calls.append((len(prompts), sampling, prompt_offset))
        out = []
        for i, prompt in enumerate(prompts):
            for j in range(sampling.n):
                text = self.script["".join(map(chr, prompt))][j]
                cut = text.endswith("~")
                ids = [ord(c) for c in text.rstrip("~")] + ([] if cut else [EOS])
                out.append(Generation(prompt_offset + i, j, ids, [0.0] * len(ids), "length" if cut else "stop"))
        return out[::-1]  # the runner must not rely on the engine's order

    def update_weights(self, buckets, version):
        raise NotImplementedError

    def health(self):
        raise NotImplementedError


PROMPTER = Prompter(render=lambda text: [ord(c) for c in text],
                    decode=lambda ids: "".join(chr(i) for i in ids if i != EOS), stop_token_ids=[EOS])


@pytest.fixture
def bench(tmp_path):
    rows = [{"q": "1+1", "a": "2"}, {"q": "2+2", "a": "4"}, {"q": "3+3", "a": 6}]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bench.yaml").write_text(
        "benchmarks:\n"
        "  - {name: add, file: add.jsonl, n: 3, temperature: 0.5, max_new_tokens: 4, answer_type: numeric,\n"
        "     question_key: q, answer_key: a, pass_k: [1, 2], prompt_template: 'Q: {question}', seed: 7}\n")
    return tmp_path


SCRIPT = {"Q: 1+1": ["2", "3", "The answer is 2"],    # 2 right; answers 2, 3, 2 -> majority 2 (right)
          "Q: 2+2": ["5", "4", "5~"],                  # 1 right, one cut; majority 5 (wrong)
          "Q: 3+3": ["no", "idea", "6"]}               # 1 right; only "6" answers -> majority right


def test_results_metrics_and_every_sample(bench):
    (spec,) = load_benchmark_specs(bench / "bench.yaml")
    assert spec.file == str(bench / "add.jsonl")  # relative to the YAML file
    engine = ScriptedEngine(SCRIPT)
    summary = run_benchmarks([spec], bench / "out", model_id="m", make_engine=lambda: engine,
                             make_prompter=lambda s: PROMPTER, grader=ResponseGrader(), progress=False,
                             log=lambda m: None)
    (_, sampling, _), = engine.calls
    assert (sampling.n, sampling.temperature, sampling.max_new_tokens, sampling.seed, sampling.stop_token_ids) == \
        (3, 0.5, 4, 7, (EOS,))
    m = summary["add"]
    assert m["avg@3"] == pytest.approx(4 / 9)
    assert m["pass@1"] == pytest.approx(4 / 9)
    # pass@2 per problem: 1 - C(1,2)/C(3,2) = 1; 1 - C(2,2)/C(3,2) = 2/3; the same 2/3.
    assert m["pass@2"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["maj@3"] == pytest.approx(2 / 3)
    assert m["truncation_rate"] == pytest.approx(1 / 9)
    assert m["mean_response_tokens"] == pytest.approx((2 + 2 + 16 + 2 + 2 + 1 + 3 + 5 + 2) / 9)
    saved = json.loads((bench / "out" / "add.json").read_text())
    assert saved["metrics"] == m and saved["settings"]["temperature"] == 0.5
    first = saved["samples"][2]
    assert {k: first[k] for k in ("problem", "sample", "response", "extracted", "score", "finish_reason")} == \
        {"problem": 0, "sample": 2, "response": "The answer is 2", "extracted": "2", "score": 1.0,
         "finish_reason": "stop"}
    assert saved["samples"][5]["finish_reason"] == "length" and saved["samples"][5]["source"].endswith("line 2")
    assert json.loads((bench / "out" / "summary.json").read_text())["benchmarks"] == {"add": m}
    table = (bench / "out" / "results.md").read_text()
    assert "| add | 3 | 3 | 0.444 | 0.667 | @1 0.444, @2 0.778 | 3.9 | 11.1% |" in table


def test_finished_benchmarks_are_not_redone_and_changes_are_refused(bench):
    (spec,) = load_benchmark_specs(bench / "bench.yaml")
    kwargs = dict(make_prompter=lambda s: PROMPTER, grader=ResponseGrader(), progress=False, log=lambda m: None)
    first = run_benchmarks([spec], bench / "out", model_id="m", make_engine=lambda: ScriptedEngine(SCRIPT), **kwargs)
    result_file = bench / "out" / "add.json"
    before = result_file.read_bytes()

    def no_engine():
        raise AssertionError("a finished benchmark started the engine")

    logs = []
    again = run_benchmarks([spec], bench / "out", model_id="m", make_engine=no_engine,
                           **{**kwargs, "log": logs.append})
    assert again == first and result_file.read_bytes() == before
    assert logs == [f"[add] finished before ({result_file}), not redone"]
    # A second benchmark added later is evaluated; the first one is still not redone.
    other = BenchmarkSpec(**{**spec.settings(), "name": "add_greedy", "temperature": 0.0})
    engine = ScriptedEngine(SCRIPT)
    both = run_benchmarks([spec, other], bench / "out", model_id="m", make_engine=lambda: engine, **kwargs)
    assert list(both) == ["add", "add_greedy"] and len(engine.calls) == 1 and engine.calls[0][1].temperature == 0.0
    with pytest.raises(ResultMismatch, match="different settings; write to another --out directory"):
        run_benchmarks([BenchmarkSpec(**{**spec.settings(), "n": 2})], bench / "out", model_id="m",
                       make_engine=no_engine, **kwargs)
    with pytest.raises(ResultMismatch, match="different model"):
        run_benchmarks([spec], bench / "out", model_id="other", make_engine=no_engine, **kwargs)
    (bench / "add.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    with pytest.raises(ResultMismatch, match="different file_sha256"):
        run_benchmarks([spec], bench / "out", model_id="m", make_engine=no_engine, **kwargs)


def test_math_answers_go_through_the_verifier_pool(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"question": "half?", "answer": "\\\\frac{1}{2}"}\n')
    spec = BenchmarkSpec(name="m", file=str(tmp_path / "m.jsonl"), n=3, answer_type="math")
    script = {"half?": ["<answer>0.5</answer>", "\\boxed{1/2}", "<answer>2</answer>"]}
    with ResponseGrader(num_workers=1) as grader:
        summary = run_benchmarks([spec], tmp_path / "out", model_id="m", make_engine=lambda: ScriptedEngine(script),
                                 make_prompter=lambda s: PROMPTER, grader=grader, progress=False, log=lambda m: None)
    samples = json.loads((tmp_path / "out" / "m.json").read_text())["samples"]
    assert [(s["extracted"], s["score"]) for s in samples] == [("0.5", 1.0), ("1/2", 1.0), ("2", 0.0)]
    # Equivalent answers written differently vote apart: 0.5, 1/2, 2 tie, the first (right) wins.
    assert summary["m"]["maj@3"] == 1.0


def test_benchmark_yaml_and_row_problems_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("- {name: x, file: f.jsonl, temprature: 0.7}\n")
    with pytest.raises(ValueError, match=r"benchmark 1 \('x'\): unknown key\(s\) \['temprature'\]"):
        load_benchmark_specs(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("- {name: x, file: f.jsonl}\n- {name: x, file: g.jsonl}\n")
    with pytest.raises(ValueError, match=r"repeated: \['x'\]"):
        load_benchmark_specs(tmp_path / "b.yaml")
    with pytest.raises(ValueError, match=r"pass_k=\[1, 8\] has \[8\] outside 1..n=4"):
        BenchmarkSpec(name="x", file="f", n=4, pass_k=[1, 8])
    with pytest.raises(ValueError, match=r"prompt_template uses \['choices', 'question'\]"):
        BenchmarkSpec(name="x", file="f", prompt_template="{question} {choices}")
    (tmp_path / "mc.jsonl").write_text('{"question": "Capital?", "options": ["Paris", "Rome"], "answer": "Rome"}\n'
                                       '{"question": "Capital?", "options": ["Paris", "Rome"], "answer": "Oslo"}\n')
    spec = BenchmarkSpec(name="mc", file=str(tmp_path / "mc.jsonl"), answer_type="multiple_choice",
                         choices_key="options", prompt_template="{question}\n{choices}")
    first = read_benchmark_rows(BenchmarkSpec(**{**spec.settings(), "limit": 1}))[0]
    assert first.user_text(spec.prompt_template) == "Capital?\n(A) Paris\n(B) Rome"
    with pytest.raises(DataError, match=r"mc.jsonl, line 2: the ground truth 'Oslo' is neither a letter"):
        read_benchmark_rows(spec)


def test_train_eval_sets_problems_are_input_problems(tmp_path):
    from rlsd_megatron.config import Config, TrainConfig
    from rlsd_megatron.eval.in_training import eval_sets_problems as problems_of

    def eval_sets_problems(train):
        return problems_of(Config(train=train))

    assert eval_sets_problems(TrainConfig()) == []
    (tmp_path / "e.yaml").write_text("- {name: x, file: gone.jsonl}\n")
    assert eval_sets_problems(TrainConfig(eval_sets=str(tmp_path / "e.yaml"))) == [
        f"train.eval_sets='{tmp_path / 'e.yaml'}': benchmark 'x': file '{tmp_path / 'gone.jsonl'}' does not exist (a "
        "relative path in the YAML is relative to the YAML file's directory)."]
    (tmp_path / "ok.jsonl").write_text('{"question": "1+1", "answer": "2"}\n')
    (tmp_path / "s.yaml").write_text("- {name: x, file: ok.jsonl, system_prompt: Be brief.}\n")
    (problem,) = eval_sets_problems(TrainConfig(eval_sets=str(tmp_path / "s.yaml")))
    assert problem.endswith("benchmarks ['x'] set system_prompt; during training prompts use the training data's "
                            "renderer (data settings), so remove it.")
    (tmp_path / "g.yaml").write_text("- {name: x, file: ok.jsonl, answer_type: numeric}\n")
    assert eval_sets_problems(TrainConfig(eval_sets=str(tmp_path / "g.yaml"))) == []
    assert eval_sets_problems(TrainConfig(eval_sets=str(tmp_path / "missing.yaml")))[0].startswith(
        f"train.eval_sets='{tmp_path / 'missing.yaml'}': [Errno 2] No such file or directory")
