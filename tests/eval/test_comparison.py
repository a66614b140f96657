"""The paper-style table from rlsd-eval summaries, against hand-computed means and standard errors."""

import pytest

from rlsd_megatron.eval.comparison import comparison_table


def summary(a: float, b: float) -> dict:
    return {"add3": {"avg@8": a, "maj@8": 0.0, "problems": 4}, "add4": {"avg@4": b, "pass@1": b}}


def test_rows_per_method_columns_per_benchmark_and_the_mean():
    table = comparison_table({"rlsd": [summary(0.5, 0.1), summary(0.7, 0.3)], "grpo": [summary(0.4, 0.0)]})
    lines = table.splitlines()
    assert lines[0] == "| method | add3 avg@8 | add4 avg@4 | mean |"
    # rlsd: add3 mean 0.6, s.e. stdev(0.5, 0.7)/sqrt(2) = 0.1414/1.414 = 0.1; add4 0.2 ± 0.1;
    # per-seed means 0.3 and 0.5 -> 0.4 ± 0.1.
    assert lines[2] == "| rlsd | 0.600 ± 0.100 | 0.200 ± 0.100 | 0.400 ± 0.100 |"
    assert lines[3] == "| grpo | 0.400 | 0.000 | 0.200 |"


def test_runs_on_other_benchmarks_are_refused():
    with pytest.raises(ValueError, match=r"run 2 of 'rlsd' has benchmarks \['add3'\]"):
        comparison_table({"rlsd": [summary(0.5, 0.1), {"add3": {"avg@8": 0.1}}]})


def test_command_line_reads_eval_directories_and_repeats_a_method_per_seed(tmp_path, capsys):
    import json

    from rlsd_megatron.eval.comparison import main

    for name, (a, b) in {"r1": (0.5, 0.1), "r2": (0.7, 0.3), "g1": (0.4, 0.0)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"benchmarks": summary(a, b)}))
    out = tmp_path / "table" / "benchmarks.md"
    assert main([f"rlsd={tmp_path / 'r1'}", f"grpo={tmp_path / 'g1'}", f"rlsd={tmp_path / 'r2'}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert printed.splitlines()[2] == "| rlsd | 0.600 ± 0.100 | 0.200 ± 0.100 | 0.400 ± 0.100 |"
    assert main([f"grpo={tmp_path / 'missing'}"]) == 2
    assert "has rlsd-eval finished" in capsys.readouterr().err
