"""What the teacher reads, per method record, on the built-in task's prompts (texts written out by hand)."""

import pytest
import torch

from rlsd_megatron.config import load_config
from rlsd_megatron.data import ReversedAdditionPrompts
from rlsd_megatron.data.teacher_context import TeacherContextBuilder
from rlsd_megatron.trainer.rollouts import Rollouts
from rlsd_megatron.trainer.teacher import teacher_contexts

DATASET = ReversedAdditionPrompts("train")


def two_prompts_two_responses() -> Rollouts:
    """Two prompts, each with a right response (the row's answer) and a wrong one."""
    rows = [DATASET[12 * 1000 + 34], DATASET[5 * 1000 + 6]]
    texts = [rows[0].answer, "99", "11", rows[1].answer]
    responses = [DATASET.tokenizer.encode(t) for t in texts]
    return Rollouts(rows, responses, [[0.0] * len(r) for r in responses], ["stop"] * 4,
                    rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]))


def algorithm(method: str):
    return load_config("examples/configs/cpu_demo.yaml", [f"algorithm.method={method}"]).algorithm


def teacher_prompts(method: str) -> list[str]:
    rollouts = two_prompts_two_responses()
    contexts = teacher_contexts(algorithm(method), rollouts, DATASET)
    for context, response in zip(contexts, rollouts.responses):  # the student's own tokens, after the prompt
        assert context.input_ids[context.response_start:] == response
        assert context.response_length == len(response)
    return [DATASET.decode(c.input_ids[1: c.response_start]) for c in contexts]  # without BOS


def test_hinted_methods_show_the_dataset_answer():
    rows = two_prompts_two_responses().rows
    hinted = [f"{rows[0].question}|{rows[0].answer}="] * 2 + [f"{rows[1].question}|{rows[1].answer}="] * 2
    for method in ("rlsd", "opsd", "grpo_opsd"):
        assert teacher_prompts(method) == hinted, method


def test_sdpo_shows_a_successful_sibling_or_nothing():
    rows = two_prompts_two_responses().rows
    # Prompt 0: response 0 is the only success, so response 1 sees it and response 0 (excluding
    # itself) sees no hint; prompt 1 the same with response 3.
    assert teacher_prompts("sdpo") == [f"{rows[0].question}=", f"{rows[0].question}|{rows[0].answer}=",
                                       f"{rows[1].question}|{rows[1].answer}=", f"{rows[1].question}="]
    contexts = teacher_contexts(algorithm("sdpo"), two_prompts_two_responses(), DATASET)
    assert [c.has_teacher for c in contexts] == [False, True, True, False]


def test_opd_reads_the_students_own_prompt():
    rollouts = two_prompts_two_responses()
    contexts = teacher_contexts(algorithm("opd"), rollouts, DATASET)
    assert [c.input_ids for c in contexts] == [s.tolist() for s in rollouts.sequences()]


def test_methods_without_a_teacher_are_refused():
    with pytest.raises(ValueError, match="algorithm.method=grpo has no teacher"):
        teacher_contexts(algorithm("grpo"), two_prompts_two_responses(), DATASET)


class _CharDataset:
    """A dataset whose tokens are characters, so a response can carry a <thought> span."""

    teacher_context = TeacherContextBuilder(lambda text: [ord(c) for c in text], max_reference_tokens=None,
                                            sdpo_template="{question}|{solution}")

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(i) for i in ids)


def test_sdpo_teacher_sees_the_siblings_answer_without_its_thinking():
    rows = two_prompts_two_responses().rows[:1]
    texts = ["<thought>carry the 1</thought>\n<answer>46</answer>", "<answer>99</answer>"]
    responses = [[ord(c) for c in t] for t in texts]
    rollouts = Rollouts(rows, responses, [[0.0] * len(r) for r in responses], ["stop"] * 2,
                        rewards=torch.tensor([1.0, 0.0]))

    def hint_of_the_wrong_response(overrides):
        config = load_config("examples/configs/cpu_demo.yaml", ["algorithm.method=sdpo", *overrides])
        context = teacher_contexts(config.algorithm, rollouts, _CharDataset(), think_tag=config.reward.think_tag)[1]
        return _CharDataset.decode(context.input_ids[:context.response_start])

    assert hint_of_the_wrong_response([]) == f"{rows[0].question}|<answer>46</answer>"
    assert hint_of_the_wrong_response(["algorithm.sdpo_remove_thinking=false"]) == f"{rows[0].question}|{texts[0]}"


def test_sdpo_paper_teacher_sees_the_shortest_correct_and_incorrect_sibling():
    # One prompt, four responses (a token per character): correct 0 (27 tokens) and 2 (11); 1 (9) and
    # 3 (12) are incorrect at threshold 0.5 (1's 0.1 is a format-only reward).
    rows = two_prompts_two_responses().rows[:1]
    texts = ["<t>a</t><answer>46</answer>", "<answer>9", "46</answer>", "<answer>77</"]
    responses = [[ord(c) for c in t] for t in texts]
    rollouts = Rollouts(rows, responses, [[0.0] * len(r) for r in responses], ["stop"] * 4,
                        rewards=torch.tensor([1.0, 0.1, 1.0, 0.0]))

    def teacher_prompts_of(overrides):
        config = load_config("examples/configs/cpu_demo.yaml", [
            "algorithm.method=sdpo", "algorithm.sdpo_demonstrations=shortest_correct_and_incorrect", *overrides])
        contexts = teacher_contexts(config.algorithm, rollouts, _CharDataset(), think_tag="t")
        for context, response in zip(contexts, responses):
            assert context.input_ids[context.response_start:] == response and context.has_teacher
        return [_CharDataset.decode(c.input_ids[:c.response_start]) for c in contexts]

    def paper(correct: str, incorrect: str) -> str:
        return (f"Problem:\n{rows[0].question}\n\nCorrect solution:\n\n{correct}\n\n\n"
                f"The following is feedback from your unsuccessful earlier attempt:\n\n{incorrect}\n\n\n"
                "Correctly solve the original question.")

    # Each rollout's siblings, itself excluded: the shortest correct, the shortest incorrect.
    assert teacher_prompts_of(["algorithm.sdpo_remove_thinking=false"]) == [
        paper(texts[2], texts[1]), paper(texts[2], texts[3]), paper(texts[0], texts[1]), paper(texts[2], texts[1])]
    # sdpo_remove_thinking drops the <t> span of rollout 0 when rollout 2's teacher reads it.
    assert teacher_prompts_of(["algorithm.sdpo_remove_thinking=true"])[2] == paper("<answer>46</answer>", texts[1])
    # At threshold 0.05 the format-only 0.1 counts as correct (the authors' reward > 0).
    assert teacher_prompts_of(["algorithm.sdpo_success_threshold=0.05",
                               "algorithm.sdpo_remove_thinking=false"])[3] == (
        f"Problem:\n{rows[0].question}\n\nCorrect solution:\n\n{texts[1]}\n\n\n"
        "The following is feedback from your unsuccessful earlier attempt:\n\n\nCorrectly solve the original question.")
