"""Self-teacher context on a real (offline-trained) BPE tokenizer with a chat template."""

import pytest
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlsd_megatron.data.teacher_context import (
    TeacherContextBuilder,
    hf_chat_renderer,
    remove_thinking,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTION = "What is 2 + 3?"
ANSWER = "5"
REFERENCE = "Add the numbers: 2 + 3 = 5."
ROLLOUT = "<thought>two plus three</thought><answer>5</answer>"


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [QUESTION, REFERENCE, ROLLOUT, "Here is a reference solution: think step by step.",
              "After understanding the reference solution, please try to solve this problem."] * 10
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _last(ids, token_id):
    return max(i for i, t in enumerate(ids) if t == token_id)


def test_hint_sits_in_user_turn_before_rollout(tokenizer):
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer)
    response = tokenizer.encode(ROLLOUT, add_special_tokens=False)
    seq = builder.build(QUESTION, ANSWER, response, reference_solution=REFERENCE)
    assert seq.has_teacher and seq.response_length == len(response)
    assert seq.input_ids[seq.response_start:] == response  # rollout spliced as ids, untouched

    prompt = seq.input_ids[: seq.response_start]
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assistant = _last(prompt, im_start)
    user = _last(prompt[:assistant], im_start)
    # The assistant turn opens right before the rollout and holds nothing else.
    assert tokenizer.decode(prompt[assistant:]) == "<|im_start|>assistant\n"
    user_turn = tokenizer.decode(prompt[user:assistant])
    assert user_turn.startswith("<|im_start|>user\n") and user_turn.endswith("<|im_end|>\n")
    hint = "Here is a reference solution:\n" + REFERENCE
    assert hint in user_turn and user_turn.index(QUESTION) < user_turn.index(hint)
    assert "reference solution" not in tokenizer.decode(prompt[assistant:] + response)


def test_teacher_and_student_share_the_chat_template(tokenizer):
    # Same renderer for both: identical turn scaffolding, only the user text differs.
    render = hf_chat_renderer(tokenizer)
    student = render(QUESTION)
    teacher = TeacherContextBuilder(render, truncate_text=None, max_reference_tokens=None).build(
        QUESTION, ANSWER, [7, 8, 9])
    generation_prompt = tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert student[-len(generation_prompt):] == generation_prompt
    assert teacher.input_ids[: teacher.response_start][-len(generation_prompt):] == generation_prompt
    assert teacher.input_ids[:3] == student[:3]  # "<|im_start|>user\n" prefix


def test_index_map_points_at_rollout_tokens(tokenizer):
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer)
    responses = [tokenizer.encode(ROLLOUT, add_special_tokens=False), tokenizer.encode("<answer>5", add_special_tokens=False)]
    seqs = [builder.build(QUESTION, ANSWER, responses[0]),
            builder.build("What is 1 + 1?", "2", responses[1], reference_solution="1 + 1 = 2")]
    for seq, response in zip(seqs, responses):
        assert seq.logit_positions[0] == seq.response_start - 1  # last prompt token predicts the first
        assert [seq.input_ids[p + 1] for p in seq.logit_positions] == response


def test_hint_choice_and_truncation(tokenizer):
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer, max_reference_tokens=10)
    long_reference = " ".join(["step"] * 200)
    text = builder.hint_text(QUESTION, ANSWER, long_reference)
    hint = text.split("Here is a reference solution:\n")[1].split("\n\nAfter understanding")[0]
    assert 0 < len(tokenizer.encode(hint, add_special_tokens=False)) <= 10 and hint.startswith("step")
    # No (or blank) reference solution: the dataset answer is the hint (the recipe's fallback).
    for reference in (None, "  "):
        assert "Here is a reference solution:\n5\n\n" in builder.hint_text(QUESTION, ANSWER, reference)
    # The raw question opens the text, stripped; the default template is the spec's.
    assert builder.hint_text("  " + QUESTION + "\n", ANSWER).startswith(QUESTION + "\n\nHere is")
    assert builder.hint_text(QUESTION, ANSWER).endswith("The final answer MUST be enclosed within <answer> </answer> tags.")


def test_plain_callable_renderer_without_chat_template():
    # The CPU demo task: characters as token ids, its own prompt format.
    def render(user_text):
        return [ord(c) for c in f"Q: {user_text}\nA:"]

    builder = TeacherContextBuilder(render, max_reference_tokens=None, template="{question} (hint: {answer})")
    seq = builder.build("1+1?", "2", [ord("2")])
    assert "".join(map(chr, seq.input_ids)) == "Q: 1+1? (hint: 2)\nA:2"
    assert seq.input_ids[seq.logit_positions[0]] == ord(":")


def test_builder_rejects_bad_configuration():
    def render(text):
        return [1, 2]

    with pytest.raises(ValueError, match="truncate_text"):
        TeacherContextBuilder(render)  # default 12,000-token limit needs a truncator
    for bad in ("{question} only", "{question} {answer} {extra}", r"\boxed{} {answer}"):
        with pytest.raises(ValueError, match="placeholders"):
            TeacherContextBuilder(render, max_reference_tokens=None, template=bad)
    with pytest.raises(ValueError, match="no tokens"):
        TeacherContextBuilder(lambda text: [], max_reference_tokens=None).build("q", "a", [1])


def test_sdpo_teacher_with_sibling_and_fallbacks(tokenizer):
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer)
    response = tokenizer.encode("<answer>4</answer>", add_special_tokens=False)
    with_sibling = builder.build_sdpo(QUESTION, response, solution="<answer>5</answer>")
    text = tokenizer.decode(with_sibling.input_ids[: with_sibling.response_start])
    assert with_sibling.has_teacher
    assert QUESTION + "\nCorrect solution:\n\n<answer>5</answer>\n\nCorrectly solve the original question.<|im_end|>" in text
    # No successful sibling: plain prompt (= the student's context), distillation weight 0.
    alone = builder.build_sdpo(QUESTION, response, solution=None)
    assert not alone.has_teacher
    assert alone.input_ids[: alone.response_start] == hf_chat_renderer(tokenizer)(QUESTION)
    # Opt-in fallback to the dataset answer with the RLSD template.
    fallback = builder.build_sdpo(QUESTION, response, solution="", fallback_answer=ANSWER)
    assert fallback.has_teacher and "Here is a reference solution:\n5" in tokenizer.decode(fallback.input_ids)



def test_sdpo_teacher_starts_from_the_students_user_text(tokenizer):
    # Official SDPO reprompts with the student's last user message ({prompt}), task instructions
    # included, not the raw question: "<student text>\nCorrect solution:\n\n<sibling>\n\nCorrectly
    # solve the original question." Without a sibling the context is exactly the student's prompt.
    student_template = "Answer inside <answer></answer>.\n\n{question}"
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer, student_template=student_template)
    response = tokenizer.encode("<answer>4</answer>", add_special_tokens=False)
    student_text = "Answer inside <answer></answer>.\n\n" + QUESTION
    with_sibling = builder.build_sdpo("  " + QUESTION + "\n", response, solution="<answer>5</answer>")
    want = hf_chat_renderer(tokenizer)(student_text + "\nCorrect solution:\n\n<answer>5</answer>\n\n"
                                       "Correctly solve the original question.")
    assert with_sibling.input_ids[: with_sibling.response_start] == want
    alone = builder.build_sdpo(QUESTION, response, solution=None)
    assert alone.input_ids[: alone.response_start] == hf_chat_renderer(tokenizer)(student_text)
    # The RLSD / OPSD teacher still reads the raw question (spec §2).
    hinted = tokenizer.decode(builder.build(QUESTION, ANSWER, response).input_ids)
    assert QUESTION in hinted and "Answer inside" not in hinted
    with pytest.raises(ValueError, match="student_template"):
        TeacherContextBuilder(lambda text: [1], max_reference_tokens=None, student_template="no placeholder")


def test_remove_thinking():
    assert remove_thinking("<think>a\nb</think>\n\nThe answer is 5") == "The answer is 5"
    assert remove_thinking("<thought>x</thought> <answer>5</answer>", tag="thought") == "<answer>5</answer>"


# iie-ycx/RLSD@93e46f7a0312a71094498425baef8b3d28ca383f examples/visual_rl/format_prompt/sdpo_teacher.jinja,
# verbatim; opsd_algos.construct_sdpo_teacher_prompts renders it as jinja2.Template(text.strip()).
AUTHORS_SDPO_JINJA = """Problem:
{{ question | trim }}

Correct solution:
{% if correct_solution %}
{{ correct_solution | trim }}
{% endif %}

The following is feedback from your unsuccessful earlier attempt:
{% if incorrect_solution %}
{{ incorrect_solution | trim }}
{% endif %}

Correctly solve the original question.
"""


def _authors_sdpo_text(question: str, correct: str, incorrect: str) -> str:
    import jinja2

    return jinja2.Template(AUTHORS_SDPO_JINJA.strip()).render(question=question, correct_solution=correct,
                                                             incorrect_solution=incorrect)


def test_sdpo_paper_teacher_is_the_authors_template_token_for_token(tokenizer):
    # The student's text has task instructions; the paper's SDPO teacher reads the raw question.
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer, student_template="Answer inside tags.\n\n{question}")
    response = tokenizer.encode("<answer>4</answer>", add_special_tokens=False)
    correct, incorrect = "<answer>5</answer>\n", "  <thought>guess</thought><answer>6</answer>"
    render = hf_chat_renderer(tokenizer)
    # (correct, incorrect) as the builder gets them, and as the authors' template gets them (their
    # decoded text, stripped: an absent kind is "").
    for given, theirs in (((correct, incorrect), (correct.strip(), incorrect.strip())),
                          ((correct, None), (correct.strip(), "")),
                          ((None, incorrect), ("", incorrect.strip())),
                          (("  ", incorrect), ("", incorrect.strip()))):
        seq = builder.build_sdpo_paper("  " + QUESTION + "\n", response, correct=given[0], incorrect=given[1])
        assert seq.input_ids[: seq.response_start] == render(_authors_sdpo_text(QUESTION, *theirs)), given
        assert seq.input_ids[seq.response_start:] == response and seq.has_teacher
    # One case written out by hand, as a check on the jinja reading itself.
    correct_only = builder.build_sdpo_paper(QUESTION, response, correct=correct, incorrect=None)
    assert correct_only.input_ids[: correct_only.response_start] == render(
        f"Problem:\n{QUESTION}\n\nCorrect solution:\n\n<answer>5</answer>\n\n\n"
        "The following is feedback from your unsuccessful earlier attempt:\n\n\nCorrectly solve the original question.")
    # Neither kind: the authors' empty template, and no teacher signal to distil.
    alone = builder.build_sdpo_paper(QUESTION, response, correct=None, incorrect="")
    assert alone.input_ids[: alone.response_start] == render(_authors_sdpo_text(QUESTION, "", ""))
    assert not alone.has_teacher


def test_sdpo_paper_demonstrations_are_cut_to_the_reference_limit(tokenizer):
    builder = TeacherContextBuilder.from_hf_tokenizer(tokenizer, max_reference_tokens=10)
    seq = builder.build_sdpo_paper(QUESTION, [7], correct=" ".join(["step"] * 200), incorrect="<answer>6</answer>")
    text = tokenizer.decode(seq.input_ids[: seq.response_start])
    block = text.split("Correct solution:\n\n")[1].split("\n\n\nThe following is feedback")[0]
    assert block.startswith("step") and 0 < len(tokenizer.encode(block, add_special_tokens=False)) <= 10
    assert "attempt:\n\n<answer>6</answer>\n\n\nCorrectly solve" in text
