"""Math answers in model output: tag normalisation, the format check, answer extraction, and
the math-verify comparison (spec §1; details from the reference recipe's math reward).

Every function here reads untrusted model output, so the text helpers run in linear time: the
recipe's regular expressions (``\\s*(<|>|/)\\s*``, ``<thought>.*</thought>.*<answer>.*</answer>``,
``<answer>(.*?)</answer>``) can backtrack quadratically or worse on adversarial text, and the
replacements below give the same results (tests compare them on random strings).
:func:`math_accuracy` parses with sympy (through math-verify), which can hang or exhaust memory
on adversarial input: call it only inside a :class:`~rlsd_megatron.rewards.verifier_pool.VerifierPool`
worker. This module imports neither torch nor anything heavy at import time.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "extract_answer",
    "format_score",
    "last_boxed",
    "math_accuracy",
    "normalize_tag_spacing",
    "strip_math_delimiters",
]

_SPACE_AFTER_TAG_CHAR = re.compile(r"(?<=[<>/])\s+")

# The recipe skips symbolic grading for answers this long (a long natural-language "answer" was
# its common out-of-memory trigger): more characters, line breaks or words than these.
_MAX_VERIFY_CHARS = 512
_MAX_VERIFY_LINES = 8
_MAX_VERIFY_WORDS = 128


def normalize_tag_spacing(text: str) -> str:
    """Remove whitespace next to ``<``, ``>`` and ``/`` (so ``< /answer >`` reads ``</answer>``).

    Same result as the recipe's ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1", text)``, applied to the
    response before both the format and the accuracy check, in linear time: whitespace after
    such a character is removed on the text, whitespace before it on the reversed text.
    """
    text = _SPACE_AFTER_TAG_CHAR.sub("", text)
    return _SPACE_AFTER_TAG_CHAR.sub("", text[::-1])[::-1]


def format_score(response: str, *, think_tag: str = "thought", answer_tag: str = "answer") -> float:
    """1.0 when the whole response matches ``<think_tag>…</think_tag>…<answer_tag>…</answer_tag>``.

    Equivalent to ``re.fullmatch(r"<T>.*</T>.*<A>.*</A>", response, re.DOTALL)`` (the recipe's
    check, case-sensitive) without backtracking: it starts with ``<T>`` and ends with ``</A>``,
    and the first ``</T>`` after the opening tag is followed by an ``<A>`` that ends before the
    closing answer tag. Pass the response through :func:`normalize_tag_spacing` first, as the
    recipe does.
    """
    open_think, close_think = f"<{think_tag}>", f"</{think_tag}>"
    open_answer, close_answer = f"<{answer_tag}>", f"</{answer_tag}>"
    if not (response.startswith(open_think) and response.endswith(close_answer)):
        return 0.0
    answer_end = len(response) - len(close_answer)
    think_end = response.find(close_think, len(open_think))
    if think_end < 0:
        return 0.0
    answer_start = response.find(open_answer, think_end + len(close_think))
    return 1.0 if 0 <= answer_start and answer_start + len(open_answer) <= answer_end else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{…}`` (braces balanced), or None."""
    found = None
    start = text.find("\\boxed{")
    while start >= 0:
        depth, i = 1, start + len("\\boxed{")
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            break  # unbalanced: no later box can close either
        found = text[start + len("\\boxed{"): i - 1]
        start = text.find("\\boxed{", i)
    return found


def extract_answer(response: str, *, answer_tag: str = "answer") -> str:
    """The answer a response gives: the first ``<answer>…</answer>`` content (tag matched
    case-insensitively, as the recipe does), else the last ``\\boxed{}``, else ``""``, stripped.

    ``""`` means "no answer given" (scored 0 without calling the verifier); the whole response
    is never handed to the verifier.
    """
    opening = re.search(re.escape(f"<{answer_tag}>"), response, re.IGNORECASE)
    if opening is not None:
        closing = re.compile(re.escape(f"</{answer_tag}>"), re.IGNORECASE).search(response, opening.end())
        if closing is not None:
            return response[opening.end(): closing.start()].strip()
    boxed = last_boxed(response)
    return boxed.strip() if boxed else ""


def strip_math_delimiters(text: str) -> str:
    """Strip surrounding whitespace and one pair of ``$…$`` or ``$$…$$`` (recipe's ground-truth cleanup)."""
    text = text.strip()
    for delim in ("$$", "$"):
        if len(text) >= 2 * len(delim) and text.startswith(delim) and text.endswith(delim):
            return text[len(delim): -len(delim)].strip()
    return text


def _worth_verifying(text: str) -> bool:
    return (len(text) <= _MAX_VERIFY_CHARS and text.count("\n") <= _MAX_VERIFY_LINES
            and len(text.split()) <= _MAX_VERIFY_WORDS)


def _parse(text: str) -> list:
    from math_verify import parse

    # Extracted answers are bare LaTeX ("\frac{1}{2}", "2^{1/2}"); math-verify reads them
    # reliably only inside math delimiters. Timeouts are the worker pool's job (math-verify's
    # own use SIGALRM and would hide a timeout as a wrong answer).
    parsed = parse(f"${text}$", parsing_timeout=None)
    return parsed if parsed else parse(text, parsing_timeout=None)


def math_accuracy(response: str, ground_truth: str, answer_tag: str = "answer") -> float:
    """1.0 when the response's answer equals the ground truth mathematically, else 0.0.

    ``response`` should already be tag-normalised (:func:`normalize_tag_spacing`). The answer is
    :func:`extract_answer`'s; the ground truth loses ``$`` delimiters and, when it holds an
    ``<answer>`` or ``\\boxed{}``, is reduced to that. Identical strings match without parsing;
    answers over the recipe's size guards (512 characters, 8 lines, 128 words) match only so.
    Otherwise ``math_verify.verify(parse(gold), parse(answer))``. Untrusted input: run it in a
    verifier-pool worker, which enforces the time limit.
    """
    answer = strip_math_delimiters(extract_answer(response, answer_tag=answer_tag))
    gold = strip_math_delimiters(ground_truth)
    gold = strip_math_delimiters(extract_answer(gold, answer_tag=answer_tag) or gold)
    if not answer or not gold:
        return 0.0
    if answer == gold:
        return 1.0
    if not (_worth_verifying(answer) and _worth_verifying(gold)):
        return 0.0
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warning
    return 1.0 if verify(_parse(gold), _parse(answer), timeout_seconds=None) else 0.0
