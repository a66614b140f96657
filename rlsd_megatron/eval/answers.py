"""Answer types for benchmarks: multiple choice, numeric with tolerance, exact string.

Each type turns a response into an extracted answer (a string, what maj@n votes on; None when
the response gives none) and a score (0.0 / 1.0). Free-form math is not here: it stays the
sandboxed math-verify pool (``rewards.verifier_pool`` running ``rewards.math_answer.math_accuracy``),
which ``eval.grading`` drives; these three are plain text handling in linear time and safe to run
in-process on untrusted output.

Where an answer is looked for, in every type: an ``<answer>…</answer>`` or the last ``\\boxed{}``
(``rewards.math_answer.extract_answer``, the recipe's format) wins; otherwise the type's own
reading of the whole response.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

from rlsd_megatron.rewards.math_answer import extract_answer, normalize_tag_spacing

__all__ = ["ANSWER_TYPES", "Graded", "choice_letters", "extract_choice", "extract_number", "gold_choice",
           "grade_exact", "grade_multiple_choice", "grade_numeric", "parse_number"]

ANSWER_TYPES = ("math", "multiple_choice", "numeric", "exact")


@dataclass(frozen=True)
class Graded:
    """One graded response: ``answer`` (the extracted answer, None when none) and ``score``."""

    answer: str | None
    score: float


def _tagged(response: str) -> str:
    return extract_answer(normalize_tag_spacing(response))


# --------------------------------------------------------------------------------------------
# Multiple choice

_MAX_CHOICES = 26


def choice_letters(choices: Sequence[str] | None) -> str:
    """The letters a question allows: one per choice (A, B, ...), A-J without a choice list."""
    if choices is None:
        return "ABCDEFGHIJ"
    if not 2 <= len(choices) <= _MAX_CHOICES:
        raise ValueError(f"a multiple-choice question needs 2 to {_MAX_CHOICES} choices; got {len(choices)}.")
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(choices)]


def _letter(fragment: str, letters: str) -> str | None:
    """The letter a short fragment names: ``B``, ``(B)``, ``[B]``, ``B.``, ``Option B``,
    ``\\text{B}``, or a marked letter followed by text (``(B) Paris``, ``B. Paris``, ``B) Paris``;
    an unmarked one is a word: ``A ball``); None otherwise. Case-sensitive (``a`` is a word)."""
    text = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", fragment).strip()
    text = re.sub(r"^(?:option|choice)\s+", "", text, flags=re.IGNORECASE)
    match = (re.fullmatch(r"\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)]?", text.rstrip(".:;,!"))
             or re.fullmatch(r"(?:\(([A-Z])\)|\[([A-Z])\]|([A-Z])[.:)])\s.*", text, flags=re.DOTALL))
    letter = match and next(g for g in match.groups() if g)
    return letter if letter and letter in letters else None


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


# "The answer is (B)", "Answer: B", "the correct option is B." — the last such statement counts.
# Possessive quantifiers: adjacent optional runs of whitespace would backtrack polynomially on a
# degenerate response (a long run of spaces after "answer is").
_STATEMENT = re.compile(r"(?:answer|option|choice)\s*+(?:is\s*+:?|:)[\s*]*+"
                        r"(?:option\s++|choice\s++)?[(\[]?((?-i:[A-Z]))(?!\w)", re.IGNORECASE)


def extract_choice(response: str, choices: Sequence[str] | None = None) -> str | None:
    """The letter a response chooses, or None. In order: the tag / box content read as a letter
    or as an option's text; the last "answer is X" / "Answer: X" statement; a response that
    starts with a letter in a marker form (``B``, ``(B)``, ``B.``, ``B) because…``); the one
    option whose text the response contains as whole words (none when several are named)."""
    letters = choice_letters(choices)
    tagged = _tagged(response)
    if tagged:
        return _letter(tagged, letters) or _choice_by_text(tagged, choices, whole=True)
    found = None
    for match in _STATEMENT.finditer(response):
        found = match.group(1) if match.group(1) in letters else found
    if found:
        return found
    first_line = response.strip().split("\n", 1)[0]
    return _letter(first_line, letters) or _choice_by_text(response, choices, whole=False)


def _choice_by_text(text: str, choices: Sequence[str] | None, *, whole: bool) -> str | None:
    """The letter of the option ``text`` is (``whole``) or names as whole words (exactly one)."""
    if not choices:
        return None
    norm = _norm(text)
    if whole:
        hits = [i for i, c in enumerate(choices) if _norm(c) == norm]
    else:
        hits = [i for i, c in enumerate(choices)
                if _norm(c) and re.search(rf"(?<!\w){re.escape(_norm(c))}(?!\w)", norm)]
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[hits[0]] if len(hits) == 1 else None


def gold_choice(gold: str, choices: Sequence[str] | None = None) -> str:
    """The letter of the ground truth, given as a letter (``B``, ``(B)``) or as an option's text;
    raises ValueError naming the value and the choices when it is neither."""
    letters = choice_letters(choices)
    letter = _letter(str(gold), letters) or _choice_by_text(str(gold), choices, whole=True)
    if letter is None:
        raise ValueError(f"the ground truth {gold!r} is neither a letter in {letters!r} nor the text of one of "
                         f"the choices {list(choices or [])[:6]}; give the answer as a letter or an option's text.")
    return letter


def grade_multiple_choice(response: str, gold: str, choices: Sequence[str] | None = None) -> Graded:
    """Score 1.0 when the chosen letter (:func:`extract_choice`) is the gold one (:func:`gold_choice`)."""
    answer = extract_choice(response, choices)
    return Graded(answer, float(answer is not None and answer == gold_choice(gold, choices)))


# --------------------------------------------------------------------------------------------
# Numeric

# \frac{a}{b}, a/b, or a decimal with optional sign, thousands separators and exponent.
_NUMBER = re.compile(r"-?\\frac\{\s*-?\d+(?:\.\d+)?\s*\}\{\s*-?\d+(?:\.\d+)?\s*\}"
                     r"|-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?|[eE][-+]?\d+)?"
                     r"|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """``text`` as an exact number (``3``, ``-2.50``, ``1,234``, ``3/4``, ``\\frac{3}{4}``,
    ``1.5e-3``, ``.5``), or None when it is not one."""
    text = text.strip().replace(",", "")
    frac = re.fullmatch(r"(-?)\\frac\{\s*(-?[\d.]+)\s*\}\{\s*(-?[\d.]+)\s*\}", text)
    try:
        if frac:
            value = Fraction(frac.group(2)) / Fraction(frac.group(3))
            return -value if frac.group(1) else value
        if "/" in text:
            num, den = text.split("/")
            return Fraction(num.strip()) / Fraction(den.strip())
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_number(response: str) -> Fraction | None:
    """The number a response answers: the last number of the tag / box content when there is
    one, else of the whole response (GSM8K's "flexible" reading; ``rewards.final_number`` reads
    the same way for training, without fractions or exponents)."""
    text = _tagged(response) or response
    last = None
    for last in _NUMBER.finditer(text):
        pass
    return parse_number(last.group(0)) if last else None


def grade_numeric(response: str, gold: str, *, rel_tol: float = 1e-6, abs_tol: float = 0.0) -> Graded:
    """Score 1.0 when ``|answer - gold| <= abs_tol + rel_tol·|gold|`` (exact when both tolerances
    are 0); the answer is :func:`extract_number`'s, reported as a decimal string."""
    expected = parse_number(str(gold))
    if expected is None:
        raise ValueError(f"the ground truth {gold!r} is not a number; the numeric answer type needs one "
                         "(use answer_type exact or math for other answers).")
    value = extract_number(response)
    if value is None:
        return Graded(None, 0.0)
    close = abs(value - expected) <= Fraction(abs_tol) + Fraction(rel_tol) * abs(expected)
    return Graded(_format_number(value), float(close))


def _format_number(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else repr(float(value))


# --------------------------------------------------------------------------------------------
# Exact string

def grade_exact(response: str, gold: str, *, case_sensitive: bool = True) -> Graded:
    """Score 1.0 when the answer (tag / box content, else the whole response), with whitespace
    runs collapsed and the ends stripped, equals the gold string treated alike."""
    answer = " ".join((_tagged(response) or response).split())
    expected = " ".join(str(gold).split())
    if not answer:
        return Graded(None, 0.0)
    same = answer == expected if case_sensitive else answer.casefold() == expected.casefold()
    return Graded(answer, float(same))
