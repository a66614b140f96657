"""Prompts, self-teacher context and rewards with SmolLM2's real tokenizer and chat template, on
the model's real outputs (the `real` tier).

Data rows come from `tools/make_math_data.py` (GSM8K originals and symbolic variants, and the
simple arithmetic problems of the example); the student prompts are rendered by the trainer's
dataset class and answered by the embedded engine (greedy, the model's real weights). Checks:
- the student prompt is exactly the chat template's text for [default system, user: the math
  instruction + question] + the assistant header, with the template's special tokens as single
  tokens;
- the self-teacher sequence decodes to exactly the chat template's text for the conversation
  [system, user: question + the worked solution as hint, assistant: the student's response]: the
  hint sits in the user turn, the response tokens follow the assistant header unchanged, and the
  EOS the student sampled is the `<|im_end|>` that closes the assistant turn in the template;
- the rewards read the decoded responses (EOS stripped): the recipe's math reward gives the
  format and accuracy the response text shows, the final-number reward the number it ends with.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

pytestmark = pytest.mark.real

ARITHMETIC_ROWS = 6
MAX_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    import tools.make_math_data as make

    out = tmp_path_factory.mktemp("data")
    train, val = make.gsm8k_rows(variants=1, val_templates=1, seed=0, templates=3)
    make.write_jsonl(train, out / "gsm8k.jsonl")
    make.write_jsonl(val, out / "gsm8k_val.jsonl")
    arithmetic, _ = make.arithmetic_rows(train=ARITHMETIC_ROWS, val=0, seed=0)
    make.write_jsonl(arithmetic, out / "arithmetic.jsonl")
    return out


@pytest.fixture(scope="module")
def dataset(data_files, real_model_dir, real_tokenizer):
    from rlsd_megatron.config import DataConfig
    from rlsd_megatron.data import build_prompt_dataset

    cfg = DataConfig(train_files=[str(data_files / "arithmetic.jsonl"), str(data_files / "gsm8k.jsonl")],
                     tokenizer_dir=str(real_model_dir), solution_key="solution", shuffle=False)
    return build_prompt_dataset(cfg, "train", tokenizer=real_tokenizer)


@pytest.fixture(scope="module")
def responses(dataset, real_model, real_model_dir):
    """Greedy responses of the real model to the arithmetic rows' student prompts."""
    from rlsd_megatron.rollout import SamplingParams
    from rlsd_megatron.rollout.buckets import pack_buckets
    from rlsd_megatron.rollout.embedded import EmbeddedEngine
    from tests.tools.test_convert import safetensors_state

    engine = EmbeddedEngine(real_model)
    engine.update_weights(pack_buckets(list(safetensors_state(real_model_dir).items()), bucket_bytes=2**26), version=0)
    rows = [dataset[i] for i in range(ARITHMETIC_ROWS)]
    generations = engine.generate([row.prompt_ids for row in rows],
                                  SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS,
                                                 stop_token_ids=(dataset.eos_id,)))
    return rows, [g.token_ids for g in generations]


def template_text(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def test_data_rows_carry_the_worked_solution(data_files, dataset):
    rows = [json.loads(line) for line in (data_files / "gsm8k.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (data_files / "gsm8k_val.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and [r["source"].startswith("gsm8k-test-") for r in rows] == [True, False] * 2

    def template_id(row):  # "gsm8k-test-473" (the original), "gsm-symbolic-473-0" (a variant)
        return re.search(r"-(\d+)(?:-\d+)?$", row["source"]).group(1)

    # The held-out template's original and variant are in val only.
    assert len(val) == 2 and len({template_id(r) for r in val}) == 1
    assert {template_id(r) for r in val}.isdisjoint(template_id(r) for r in rows)
    for row in rows + val:
        assert row["solution"].endswith(f"#### {row['answer']}") and re.fullmatch(r"-?\d+(\.\d+)?", row["answer"])
    # The first original is GSM8K test problem 473 (the package's first template), verbatim.
    assert rows[0]["question"].startswith("Benny saw a 10-foot shark") and rows[0]["answer"] == "10"
    assert rows[1]["question"] != rows[0]["question"]  # a symbolic variant of it
    assert dataset.stats["rows"] == ARITHMETIC_ROWS + 4 and dataset.stats["rows_without_solution"] == 0
    assert dataset[ARITHMETIC_ROWS].reference_solution == rows[0]["solution"]


def test_student_prompt_is_the_chat_templates_text(dataset, real_tokenizer):
    from rlsd_megatron.data import MATH_STUDENT_TEMPLATE

    row = dataset[0]
    want = template_text(real_tokenizer, [{"role": "user", "content": MATH_STUDENT_TEMPLATE.format(
        question=row.question)}], generation_prompt=True)
    assert want.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the default system turn
    assert want.endswith(f"{row.question}<|im_end|>\n<|im_start|>assistant\n")
    assert real_tokenizer.decode(row.prompt_ids) == want
    start, end = real_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert row.prompt_ids.count(start) == 3 and row.prompt_ids.count(end) == 2  # special tokens, not text
    assert dataset.eos_id == end == 2


def test_teacher_context_is_the_conversation_the_template_renders(dataset, real_tokenizer, responses):
    rows, outputs = responses
    stopped = [(row, ids) for row, ids in zip(rows, outputs) if ids[-1] == dataset.eos_id]
    assert stopped, "no greedy response ended with EOS"
    for row, ids in stopped:
        seq = dataset.teacher_context.build(row.question, row.answer, ids, reference_solution=row.reference_solution)
        assert seq.input_ids[seq.response_start:] == ids  # spliced as sampled, EOS included
        hint = dataset.teacher_context.hint_text(row.question, row.answer, row.reference_solution)
        assert row.reference_solution in hint and hint.index(row.question) < hint.index(row.reference_solution)
        conversation = [{"role": "user", "content": hint},
                        {"role": "assistant", "content": real_tokenizer.decode(ids[:-1])}]
        want = template_text(real_tokenizer, conversation, generation_prompt=False)
        assert want.endswith("<|im_end|>\n")  # the template closes the assistant turn with EOS + newline
        assert real_tokenizer.decode(seq.input_ids) == want[: -len("\n")]
        prompt = real_tokenizer.decode(seq.input_ids[: seq.response_start])
        user_turn = prompt[prompt.index("<|im_start|>user\n"): prompt.index("<|im_start|>assistant\n")]
        assert row.reference_solution in user_turn and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        # The student's sequence is the same conversation with the plain question.
        student = real_tokenizer.decode(row.prompt_ids + ids)
        assert student.count("<|im_start|>") == 3 and student.endswith("<|im_end|>")


def test_rewards_on_the_models_real_outputs(dataset, responses):
    from rlsd_megatron.config import RewardConfig
    from rlsd_megatron.rewards import RewardSample, RewardScorer
    from rlsd_megatron.rewards.final_number import final_number_reward

    rows, outputs = responses
    texts = [dataset.decode(ids) for ids in outputs]
    assert all("<|im_end|>" not in text and "<|im_start|>" not in text for text in texts)
    print("greedy responses:", json.dumps([[row.question, text] for row, text in zip(rows, texts)], indent=1))
    samples = [RewardSample(response=text, ground_truth=row.answer, response_length=len(ids), response_ids=ids)
               for row, text, ids in zip(rows, texts, outputs)]
    with RewardScorer(RewardConfig(overlong_factor=0.0), num_workers=1) as scorer:
        math = scorer.score(samples)
    with RewardScorer(RewardConfig(custom_fn="rlsd_megatron.rewards.final_number:final_number_reward",
                                   overlong_factor=0.0), num_workers=1) as scorer:
        final = scorer.score(samples)
    assert math.counts["errors"] == math.counts["timeouts"] == final.counts["errors"] == 0
    for i, (row, text) in enumerate(zip(rows, texts)):
        # Independent reading of the text: the recipe's format needs <thought>…</thought><answer>…</answer>.
        formatted = re.fullmatch(r"\s*<thought>.*</thought>.*<answer>.*</answer>\s*", text, re.DOTALL) is not None
        tag = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL) or re.search(r"\\boxed\{([^{}]*)\}", text)
        right = tag is not None and tag.group(1).strip() == row.answer
        assert float(math.components["format"][i]) == float(formatted), text
        assert float(math.components["accuracy"][i]) == float(right), text
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        assert float(final.rewards[i]) == float(bool(numbers) and float(numbers[-1]) == float(row.answer)), text
        assert final_number_reward(text, str(int(row.answer) + 1))["reward"] == 0.0
    # The small model solves some of these one-step problems in prose (measured: 1 of 6, "6 x 4 = 24
    # pencils in total."), and the final-number reward is what sees it.
    assert float(final.rewards.sum()) >= 1.0
