"""Answer extraction, the format check and math-verify equivalence (in-process: trusted inputs).

The linear-time text helpers are compared with the reference recipe's regular expressions on
random strings built from the characters and tags that matter.
"""

import random
import re
import time

import pytest

from rlsd_megatron.rewards.math_answer import (extract_answer, format_score, math_accuracy,
                                               normalize_tag_spacing, strip_math_delimiters)

PIECES = ["<thought>", "</thought>", "<answer>", "</answer>", "<ANSWER>", "<think>", "</think>", "<", ">", "/",
          " ", "\n", "\t", "x", "42", "\\boxed{", "{", "}", "< /answer >", "</ thought>"]


def random_texts(count, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randrange(0, 12))) for _ in range(count)]


def recipe_format(response, think="thought", answer="answer"):
    pattern = rf"<{think}>.*</{think}>.*<{answer}>.*</{answer}>"
    return 1.0 if re.fullmatch(pattern, response, re.DOTALL) else 0.0


def recipe_boxed(text):
    """The recipe's brace scan, written out independently."""
    results, i = [], 0
    while i < len(text):
        if text.startswith("\\boxed{", i):
            i += 7
            depth, start = 1, i
            while i < len(text) and depth > 0:
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            if depth == 0:
                results.append(text[start:i - 1])
        else:
            i += 1
    return results[-1] if results else ""


def recipe_extract(response):
    match = re.search(r"<answer>(.*?)</answer>", response, re.DOTALL | re.IGNORECASE)
    if match:
        return match.group(1).strip()
    return recipe_boxed(response).strip()


def test_tag_spacing_matches_recipe_regex():
    for text in random_texts(3000, seed=1):
        assert normalize_tag_spacing(text) == re.sub(r"\s*(<|>|/)\s*", r"\1", text), repr(text)


def test_format_matches_recipe_regex():
    for text in random_texts(5000, seed=2):
        for tags in (("thought", "answer"), ("think", "answer")):
            assert format_score(text, think_tag=tags[0], answer_tag=tags[1]) == recipe_format(text, *tags), repr(text)


def test_extraction_matches_recipe_regex():
    for text in random_texts(3000, seed=3):
        assert extract_answer(text) == recipe_extract(text), repr(text)


@pytest.mark.parametrize("response, expected", [
    ("<thought>a</thought><answer>1</answer>", 1.0),
    ("<thought>a</thought>\nso\n<answer>1</answer>", 1.0),
    ("<thought></thought><answer></answer>", 1.0),
    ("<thought>a</thought><answer>1</answer>\n", 0.0),  # trailing text after </answer>
    (" <thought>a</thought><answer>1</answer>", 0.0),  # leading text (before normalisation)
    ("<answer>1</answer>", 0.0),  # no thought
    ("<thought>a</thought>", 0.0),  # no answer
    ("<think>a</think><answer>1</answer>", 0.0),  # other tag name
    ("<thought>a<answer>1</answer></thought>", 0.0),  # answer inside the thought
])
def test_format_cases(response, expected):
    assert format_score(response) == expected


def test_format_configurable_tags_and_spacing():
    response = "<think> a </think>  < answer > 3 </ answer >"
    assert format_score(response, think_tag="think") == 0.0
    assert format_score(normalize_tag_spacing(response), think_tag="think") == 1.0


def test_extraction_prefers_answer_tag_then_last_box():
    assert extract_answer("<thought>\\boxed{1}</thought><answer> 7 </answer>") == "7"
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("<Answer>x</answer>") == "x"  # case-insensitive, like the recipe
    assert extract_answer("<answer>unclosed \\boxed{4}") == "4"
    assert extract_answer("no answer here") == ""
    assert extract_answer("\\boxed{unbalanced") == ""
    assert extract_answer("<res>5</res>", answer_tag="res") == "5"
    assert strip_math_delimiters(" $$x$$ ") == "x" and strip_math_delimiters("$") == "$"


def test_linear_time_on_adversarial_text():
    # The recipe's regexes backtrack on these; ours stay linear.
    hostile = "<thought>" + "</thought><answer>" * 20_000 + " " * 50_000 + "x"
    start = time.perf_counter()
    normalize_tag_spacing(hostile), format_score(hostile), extract_answer("<answer>" * 50_000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("answer, gold", [
    ("0.5", "\\frac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("x=2", "2"),
    ("2", "x=2"),
    ("\\dfrac{1}{2}", "$\\frac{1}{2}$"),
    ("2^{1/2}", "\\sqrt{2}"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\{2,1\\}", "\\{1,2\\}"),
    ("10\\%", "0.1"),
])
def test_equivalent_forms_are_correct(answer, gold):
    assert math_accuracy(f"<thought>t</thought><answer>{answer}</answer>", gold) == 1.0


@pytest.mark.parametrize("response, gold", [
    ("<thought>t</thought><answer>3</answer>", "4"),
    ("<thought>t</thought><answer>\\frac{1}{3}</answer>", "0.5"),
    ("<thought>the answer is 4</thought>", "4"),  # no answer tag, no box: not graded
    ("4", "4"),  # bare text is never handed to the verifier
    ("<answer></answer>", "4"),
])
def test_wrong_or_missing_answers_score_zero(response, gold):
    assert math_accuracy(response, gold) == 0.0


def test_ground_truth_forms():
    response = "<thought>t</thought><answer>6</answer>"
    assert math_accuracy(response, "$6$") == 1.0
    assert math_accuracy(response, "so \\boxed{6}") == 1.0
    assert math_accuracy("no tags \\boxed{6}", "6") == 1.0  # boxed fallback
    long_answer = "word " * 200
    assert math_accuracy(f"<answer>{long_answer}</answer>", long_answer) == 1.0  # identical: no parsing
    assert math_accuracy(f"<answer>{long_answer}</answer>", "6") == 0.0  # over the size guard
