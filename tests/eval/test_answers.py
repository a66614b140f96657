"""Answer types on tricky responses: multiple choice (letters in every dress, option text,
distractors), numbers (separators, fractions, exponents, tolerance), exact strings."""

import pytest

from rlsd_megatron.eval.answers import (Graded, extract_choice, extract_number, gold_choice, grade_exact,
                                        grade_multiple_choice, grade_numeric, parse_number)

CAPITALS = ["Paris", "London", "Berlin", "Madrid"]


@pytest.mark.parametrize("response,letter", [
    ("(B)", "B"),
    ("B.", "B"),
    ("B", "B"),
    ("B) London is the capital.", "B"),
    ("The answer is B", "B"),
    ("the answer is (C).", "C"),
    ("Answer: D", "D"),
    ("**Answer:** A", "A"),
    ("I think A is tempting, but the correct answer is C.", "C"),       # the last statement counts
    ("The answer is A... wait, no. The answer is (D)", "D"),
    ("So \\boxed{B}", "B"),
    ("\\boxed{\\text{C}}", "C"),
    ("<answer>(A) Paris</answer> and B is wrong", "A"),                 # the tag wins over later text
    ("<answer>London</answer>", "B"),                                   # option text inside the tag
    ("The capital of the UK is London.", "B"),                          # one option named as words
    ("Not Paris but London.", None),                                    # two options named: no answer
    ("A ball is round, so I pick nothing.", None),                      # "A" as an article is no choice
    ("the answer is a city in europe", None),                           # lower-case "a" is a word
    ("The answer is E", None),                                          # only A-D exist
    ("", None),
])
def test_extract_choice(response, letter):
    assert extract_choice(response, CAPITALS) == letter


def test_degenerate_responses_take_linear_time():
    import time

    started = time.perf_counter()
    for text in ("The answer is" + " " * 20_000 + "x", "Answer:" + " *" * 20_000, "1" * 20_000 + " /" + " " * 20_000,
                 "(" * 20_000, "\\boxed{" * 5_000):
        extract_choice(text, CAPITALS), extract_number(text), grade_exact(text, "B")
    assert time.perf_counter() - started < 3.0  # measured 0.6 s; the first pattern with plain `\s*` runs took minutes


def test_option_text_needs_whole_words():
    choices = ["5", "15", "25", "none of these"]
    assert extract_choice("I get 15 in total", choices) == "B"          # "5" inside "15" does not count
    assert extract_choice("It is none of these", choices) == "D"


def test_without_a_choice_list_letters_a_to_j_are_read():
    assert extract_choice("The answer is J") == "J"
    assert extract_choice("The answer is K") is None
    assert grade_multiple_choice("(J)", "J") == Graded("J", 1.0)


def test_gold_given_as_letter_or_option_text():
    assert gold_choice("C", CAPITALS) == "C"
    assert gold_choice("(C)", CAPITALS) == "C"
    assert gold_choice("berlin", CAPITALS) == "C"
    with pytest.raises(ValueError, match="'Rome' is neither a letter in 'ABCD' nor the text of one of the choices"):
        gold_choice("Rome", CAPITALS)
    assert grade_multiple_choice("The answer is (B)", "London", CAPITALS) == Graded("B", 1.0)
    assert grade_multiple_choice("The answer is (B)", "A", CAPITALS) == Graded("B", 0.0)
    assert grade_multiple_choice("no idea", "A", CAPITALS) == Graded(None, 0.0)


@pytest.mark.parametrize("text,value", [
    ("3", 3), ("-2.50", -2.5), ("1,234", 1234), ("3/4", 0.75), ("\\frac{3}{4}", 0.75), ("-\\frac{1}{2}", -0.5),
    ("1.5e-3", 0.0015), (".5", 0.5), ("1/0", None), ("three", None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert (got is None) if value is None else float(got) == pytest.approx(value, rel=0, abs=0)


def test_extract_number_reads_the_tag_then_the_last_number():
    assert extract_number("3 + 4 = 7. The answer is 7.") == 7               # the full stop is no decimal point
    assert extract_number("<answer>12</answer> (I checked 3 * 4 and 5)") == 12
    assert float(extract_number("so \\boxed{\\frac{1}{3}}")) == pytest.approx(1 / 3)
    assert extract_number("It costs $1,234.50 in total") == parse_number("1234.5")
    assert extract_number("x = -4") == -4
    assert extract_number("no digits") is None


def test_numeric_tolerance():
    assert grade_numeric("The answer is 0.333333", "1/3", rel_tol=1e-5) == Graded("0.333333", 1.0)
    assert grade_numeric("The answer is 0.333", "1/3", rel_tol=1e-5).score == 0.0
    assert grade_numeric("The answer is 0.333", "1/3", rel_tol=0, abs_tol=1e-3).score == 1.0
    assert grade_numeric("7.0", "7", rel_tol=0) == Graded("7", 1.0)             # exact: 7.0 == 7
    assert grade_numeric("7.000001", "7", rel_tol=0).score == 0.0
    assert grade_numeric("1,000,000", "1e6") == Graded("1000000", 1.0)
    assert grade_numeric("nothing", "7") == Graded(None, 0.0)
    with pytest.raises(ValueError, match="the ground truth 'seven' is not a number"):
        grade_numeric("7", "seven")


def test_exact_string():
    assert grade_exact("9750", "9750") == Graded("9750", 1.0)
    assert grade_exact("97500", "9750").score == 0.0                       # a prefix is not the answer
    assert grade_exact("  New   York \n", "New York") == Graded("New York", 1.0)
    assert grade_exact("new york", "New York").score == 0.0
    assert grade_exact("new york", "New York", case_sensitive=False).score == 1.0
    assert grade_exact("Let me think. <answer>Oslo</answer>", "Oslo") == Graded("Oslo", 1.0)
    assert grade_exact("", "Oslo") == Graded(None, 0.0)
