"""File prompt datasets: JSONL / JSON / Parquet round trips and every bad-row kind in both modes."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlsd_megatron.config import DataConfig
from rlsd_megatron.data import DataError, FilePromptDataset, MATH_STUDENT_TEMPLATE, PromptRow

ROWS = [
    {"question": "What is 1+1?", "answer": "2", "solution": "1+1 = 2, so \\boxed{2}."},
    {"question": "  Solve x^2 = 4 for x > 0.\n", "answer": 2, "solution": None},
    {"question": "Half of one?", "answer": "\\frac{1}{2}", "solution": "one over two"},
]
SKIP_HINT = ". Fix the row, or set data.bad_rows=skip to skip and count such rows."


def write_jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def student_ids(tokenizer, question):
    # Independent of the dataset's renderer: the chat template applied directly.
    text = tokenizer.apply_chat_template([{"role": "user", "content": MATH_STUDENT_TEMPLATE.format(
        question=question.strip())}], tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def expected_rows(tokenizer, sources):
    return [PromptRow(i, r["question"], str(r["answer"]), r["solution"], student_ids(tokenizer, r["question"]), src)
            for i, (r, src) in enumerate(zip(ROWS, sources))]


def test_jsonl_round_trip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], b"", ROWS[1], b"  ", ROWS[2]])
    dataset = FilePromptDataset([str(path)], DataConfig(solution_key="solution"), tokenizer)
    assert [dataset[i] for i in range(len(dataset))] == expected_rows(
        tokenizer, [f"{path}, line 1", f"{path}, line 3", f"{path}, line 5"])
    assert dataset.stats["rows"] == 3 and dataset.stats["skipped"] == 0
    assert dataset.stats["rows_without_solution"] == 1
    assert dataset.decode(dataset[0].prompt_ids).startswith("user\nYou are an intelligent assistant")



def test_sdpo_teacher_without_a_sibling_sees_the_students_own_prompt(tmp_path, tokenizer):
    # The dataset's student template reaches the SDPO teacher: with no successful sibling its
    # context is the student's prompt token for token (official SDPO's {prompt} is the student's
    # user message, instructions included).
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    dataset = FilePromptDataset([str(path)], DataConfig(), tokenizer)
    row = dataset[1]
    alone = dataset.teacher_context.build_sdpo(row.question, [5, 6], solution=None)
    assert alone.input_ids[: alone.response_start] == student_ids(tokenizer, row.question)
    with_sibling = dataset.teacher_context.build_sdpo(row.question, [5, 6], solution="<answer>2</answer>")
    assert dataset.decode(with_sibling.input_ids).count("[MATHEMATICS Tasks]") == 1


def test_parquet_and_json_round_trip(tmp_path, tokenizer):
    cfg = DataConfig(solution_key="solution")
    parquet = write_parquet(tmp_path / "train.parquet", [{**r, "answer": str(r["answer"])} for r in ROWS])
    dataset = FilePromptDataset([str(parquet)], cfg, tokenizer)
    assert [dataset[i] for i in range(3)] == expected_rows(tokenizer, [f"{parquet}, row {i}" for i in (1, 2, 3)])
    array = tmp_path / "train.json"
    array.write_text(json.dumps(ROWS, indent=1))
    dataset = FilePromptDataset([str(array)], cfg, tokenizer)
    assert [dataset[i] for i in range(3)] == expected_rows(tokenizer, [f"{array}, item {i}" for i in (1, 2, 3)])
    lines = write_jsonl(tmp_path / "lines.json", ROWS)  # JSON Lines under a .json name
    assert len(FilePromptDataset([str(lines)], cfg, tokenizer)) == 3


def test_configurable_fields_and_several_files(tmp_path, tokenizer):
    renamed = [{"problem": r["question"], "gt": r["answer"], "trajectory": r["solution"], "extra": 1} for r in ROWS]
    first = write_jsonl(tmp_path / "a.jsonl", renamed[:2])
    second = write_parquet(tmp_path / "b.parquet", renamed[2:])
    cfg = DataConfig(question_key="problem", answer_key="gt", solution_key="trajectory")
    dataset = FilePromptDataset([str(first), str(second)], cfg, tokenizer)
    assert [dataset[i] for i in range(3)] == expected_rows(
        tokenizer, [f"{first}, line 1", f"{first}, line 2", f"{second}, row 1"])
    without = FilePromptDataset([str(first)], DataConfig(question_key="problem", answer_key="gt"), tokenizer)
    assert without[0].reference_solution is None and without.stats["rows_without_solution"] == 0


LONG = "x " * 800
BAD_ROWS = [
    ("not_utf8", b'{"question": "caf\xe9", "answer": "1"}', "not valid UTF-8 (byte 0xe9 is byte 18 of the line)"),
    ("bad_json", b'{"question": "q", "answer": ', "not valid JSON (Expecting value at column 28)"),
    ("bad_json", b"[1, 2]", "expected a JSON object, got an array"),
    ("missing_field", {"answer": "1", "id": 7},
     "missing field 'question' (data.question_key); the row has fields ['answer', 'id']"),
    ("missing_field", {"question": "q"}, "missing field 'answer' (data.answer_key); the row has fields ['question']"),
    ("wrong_type", {"question": ["a"], "answer": "1"}, "field 'question' must be a string, got list ['a']"),
    ("wrong_type", {"question": "q", "answer": True}, "field 'answer' must be a string or a number, got bool True"),
    ("wrong_type", {"question": "q", "answer": "1", "solution": {"a": 1}},
     "field 'solution' must be a string or null, got dict {'a': 1}"),
    ("empty_field", {"question": " \n", "answer": "1"}, "field 'question' is empty"),
    ("prompt_too_long", {"question": LONG, "answer": "1"}, None),
]


@pytest.mark.parametrize("kind, line, message", BAD_ROWS, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_ROWS)])
def test_bad_row_error_and_skip(tmp_path, tokenizer, caplog, kind, line, message):
    cfg = DataConfig(solution_key="solution", max_prompt_length=500)
    if message is None:
        message = f"the prompt is {len(student_ids(tokenizer, LONG))} tokens, over data.max_prompt_length=500"
    path = write_jsonl(tmp_path / "train.jsonl", [ROWS[0], line, ROWS[2]])
    with pytest.raises(DataError) as excinfo:
        FilePromptDataset([str(path)], cfg, tokenizer)
    assert str(excinfo.value) == f"{path}, line 2: {message}{SKIP_HINT}"

    cfg.bad_rows = "skip"
    with caplog.at_level(logging.WARNING, logger="rlsd_megatron.data.prompts"):
        dataset = FilePromptDataset([str(path)], cfg, tokenizer)
    assert [dataset[i].question for i in range(len(dataset))] == [ROWS[0]["question"], ROWS[2]["question"]]
    assert dataset[1].source == f"{path}, line 3"
    assert dataset.stats[f"skipped_{kind}"] == 1 and dataset.stats["skipped"] == 1
    assert dataset.stats["rows_read"] == 3 and dataset.stats["rows"] == 2
    assert f"skipped 1 bad row(s) of {path} (data.bad_rows=skip); first: {path}, line 2: {message}" in caplog.text


def test_parquet_bad_row_names_the_row(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "train.parquet", [{"question": "q", "answer": "1"},
                                                      {"question": None, "answer": "2"}])
    with pytest.raises(DataError, match=rf"^{path}, row 2: field 'question' must be a string, got NoneType None\. "):
        FilePromptDataset([str(path)], DataConfig(), tokenizer)
    dataset = FilePromptDataset([str(path)], DataConfig(bad_rows="skip"), tokenizer)
    assert len(dataset) == 1 and dataset.stats["skipped_wrong_type"] == 1


def test_file_level_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        FilePromptDataset([str(tmp_path / "missing.jsonl")], DataConfig(), tokenizer)
    (tmp_path / "train.csv").write_text("question,answer\n")
    with pytest.raises(DataError, match=r"has suffix '\.csv'; supported: \['\.jsonl', '\.json', '\.parquet'\]"):
        FilePromptDataset([str(tmp_path / "train.csv")], DataConfig(), tokenizer)
    bad_array = tmp_path / "bad.json"
    bad_array.write_bytes(b'[\n{"question": "q", "answer": "1"},\n{"question": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"^{bad_array}, line 3: not valid UTF-8 \(byte 0xff\); a JSON array"):
        FilePromptDataset([str(bad_array)], DataConfig(), tokenizer)
    all_bad = write_jsonl(tmp_path / "all_bad.jsonl", [{"q": 1}])
    with pytest.raises(DataError, match="no usable rows \\(1 read, 1 skipped as bad: .*line 1: missing field"):
        FilePromptDataset([str(all_bad)], DataConfig(bad_rows="skip"), tokenizer)
    with pytest.raises(DataError, match=r"must use \{question\} and no other placeholder"):
        FilePromptDataset([str(all_bad)], DataConfig(), tokenizer, student_template="{problem}")
