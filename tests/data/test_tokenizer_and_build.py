"""The local chat tokenizer, dataset construction from DataConfig, and the teacher context that
shares the student's renderer (spec §2: hint in the user turn, same chat template)."""

import json

import pytest

from rlsd_megatron.data.teacher_context import RLSD_TEACHER_TEMPLATE, hf_chat_renderer
from rlsd_megatron.config import DataConfig, load_config
from rlsd_megatron.data import (DataError, FilePromptDataset, ReversedAdditionPrompts, build_prompt_dataset,
                                build_run_datasets, load_chat_tokenizer)
from tests.data.conftest import build_tokenizer


def test_tokenizer_dir_errors(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match="data.tokenizer_dir is not set"):
        load_chat_tokenizer(None)
    with pytest.raises(DataError, match="data.tokenizer_dir='Qwen/Qwen3-8B' is not a directory. Tokenizers are only "
                                        "loaded from a local directory, never from the hub"):
        load_chat_tokenizer("Qwen/Qwen3-8B")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(DataError, match=r"has no tokenizer files \(looked for tokenizer.json, .*found \['config.json'\]"):
        load_chat_tokenizer(tmp_path / "empty")
    plain = build_tokenizer(tmp_path / "plain", chat_template=None)
    with pytest.raises(DataError, match="has no chat template"):
        load_chat_tokenizer(plain)
    assert load_chat_tokenizer(tokenizer_dir).chat_template


def test_build_from_config(tmp_path, tokenizer_dir):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    cfg = DataConfig(train_files=[str(train)], tokenizer_dir=str(tokenizer_dir))
    dataset = build_prompt_dataset(cfg, "train")
    assert isinstance(dataset, FilePromptDataset) and len(dataset) == 1
    assert build_prompt_dataset(cfg, "val") is None  # no data.val_files: no validation set
    assert isinstance(build_prompt_dataset(DataConfig(task="reversed_addition"), "val"), ReversedAdditionPrompts)
    with pytest.raises(DataError, match="data.task='sudoku' is not a built-in task; known: \\['reversed_addition', 'visual_reversed_addition'\\]"):
        build_prompt_dataset(DataConfig(task="sudoku"))
    with pytest.raises(DataError, match="are both set; use one"):
        build_prompt_dataset(DataConfig(task="reversed_addition", train_files=[str(train)]))
    with pytest.raises(DataError, match="no training data: set data.train_files"):
        build_prompt_dataset(DataConfig())
    with pytest.raises(DataError, match="data.tokenizer_dir is not set"):
        build_prompt_dataset(DataConfig(train_files=[str(train)]))


def test_teacher_context_shares_the_student_renderer(tmp_path, tokenizer):
    question, answer, solution = "What is 1+1?", "2", "Add one to one: " + "one plus one is two. " * 20
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": question, "answer": answer, "solution": solution}) + "\n")
    cfg = DataConfig(solution_key="solution", max_solution_tokens=8)
    dataset = FilePromptDataset([str(train)], cfg, tokenizer, system_prompt="Be brief.")
    row = dataset[0]
    response = [5, 6, 7]
    teacher = dataset.teacher_context.build(row.question, row.answer, response,
                                            reference_solution=row.reference_solution)

    render = hf_chat_renderer(tokenizer, system_prompt="Be brief.")
    truncated = tokenizer.decode(tokenizer.encode(solution, add_special_tokens=False)[:8],
                                 skip_special_tokens=True).strip()
    hint_prompt = render(RLSD_TEACHER_TEMPLATE.format(question=question, answer=truncated))
    assert teacher.input_ids == hint_prompt + response and teacher.response_start == len(hint_prompt)
    # Same chat framing: the hint sits in the user turn, the assistant turn starts after it.
    text = tokenizer.decode(teacher.input_ids[: teacher.response_start])
    student_text = tokenizer.decode(row.prompt_ids)
    system = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert text.startswith(system + "What is 1+1?\n\nHere is a reference solution:\nAdd one")
    assert text.endswith("<answer> </answer> tags.<|im_end|>\n<|im_start|>assistant\n")
    assert student_text.startswith(system + "You are an intelligent assistant")
    assert student_text.endswith("tags.\n\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    # Without a reference solution the hint is the answer.
    no_solution = FilePromptDataset([str(train)], DataConfig(), tokenizer)
    hinted = no_solution.teacher_context.hint_text(no_solution[0].question, no_solution[0].answer)
    assert hinted == RLSD_TEACHER_TEMPLATE.format(question=question, answer=answer)


def _teacher_prompt_text(dataset, index, response=(5, 6, 7)):
    """What the trainer's teacher sees for row `index` (Trainer.teacher_contexts' call), as text."""
    row = dataset[index]
    teacher = dataset.teacher_context.build(row.question, row.answer, list(response),
                                            reference_solution=row.reference_solution)
    assert teacher.input_ids[teacher.response_start:] == list(response)
    return teacher.input_ids[: teacher.response_start]


def test_teacher_template_reaches_the_teacher_context(tmp_path, tokenizer_dir, tokenizer):

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "What is 1+1?", "answer": "2"}) + "\n")
    wording = "Peek at the key ({answer}) before you solve: {question}"
    cfg = load_config(None, [f"data.train_files=[{train}]", f"data.val_files=[{train}]",
                             f"data.tokenizer_dir={tokenizer_dir}", f"algorithm.teacher_template='{wording}'"])
    for dataset in build_run_datasets(cfg):
        want = hf_chat_renderer(tokenizer)("Peek at the key (2) before you solve: What is 1+1?")
        assert _teacher_prompt_text(dataset, 0) == want
        assert "<|im_start|>user\nPeek at the key (2) before you solve" in tokenizer.decode(want)
    default = build_run_datasets(load_config(None, [f"data.train_files=[{train}]",
                                                    f"data.tokenizer_dir={tokenizer_dir}"]))
    assert _teacher_prompt_text(default[0], 0) == hf_chat_renderer(tokenizer)(
        RLSD_TEACHER_TEMPLATE.format(question="What is 1+1?", answer="2"))
    assert default[1] is None

    # The built-in task: its renderer is [<bos>] + characters + "=", its default wording question|answer.
    task = build_run_datasets(load_config(None, ["data.task=reversed_addition",
                                                 "algorithm.teacher_template='{answer}|{question}'"]))[0]
    row = task[0]
    assert _teacher_prompt_text(task, 0) == task.render_prompt(f"{row.answer}|{row.question}")
    with pytest.raises(DataError, match=r"algorithm.teacher_template='hint: \{answer\}' cannot be written in the "
                                        r"reversed_addition/train task's tokens: character 'h' is not in the task "
                                        r"alphabet"):
        build_run_datasets(load_config(None, ["data.task=reversed_addition",
                                              "algorithm.teacher_template='hint: {answer}'"]))


def test_teacher_hint_per_row_from_a_column(tmp_path, tokenizer_dir, tokenizer):
    # The authors' per-row teacher context (their data.trajectory_key) is a column inserted in the
    # template's hint slot, falling back to the answer: data.solution_key here.
    rows = [{"question": "What is 1+1?", "answer": "2", "teacher_prompt": "Count: one, then one more."},
            {"question": "Solve x^2 = 4 for x > 0.", "answer": "2", "teacher_prompt": None},
            {"question": "What is 2+2?", "answer": "4"}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [f"data.train_files=[{train}]", f"data.tokenizer_dir={tokenizer_dir}",
                             "data.solution_key=teacher_prompt"])
    dataset, _ = build_run_datasets(cfg)
    render = hf_chat_renderer(tokenizer)
    hints = ["Count: one, then one more.", "2", "4"]
    for i, (row, hint) in enumerate(zip(rows, hints)):
        assert _teacher_prompt_text(dataset, i) == render(RLSD_TEACHER_TEMPLATE.format(question=row["question"].strip(),
                                                                                       answer=hint))
    assert dataset.stats["rows_without_solution"] == 2
