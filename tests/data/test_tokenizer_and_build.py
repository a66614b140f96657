"""The local chat tokenizer, dataset construction from DataConfig, and the teacher context that
shares the student's renderer (spec §2: hint in the user turn, same chat template)."""

import json

import pytest

from rlsd_megatron.algorithms import RLSD_TEACHER_TEMPLATE, hf_chat_renderer
from rlsd_megatron.config import DataConfig
from rlsd_megatron.data import (DataError, FilePromptDataset, ReversedAdditionPrompts, build_prompt_dataset,
                                load_chat_tokenizer)
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
    with pytest.raises(DataError, match="data.task='sudoku' is not a built-in task; known: \\['reversed_addition'\\]"):
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
