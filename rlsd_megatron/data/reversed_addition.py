"""Built-in verifiable task: reversed 3-digit addition (after shared/notes/cpu-demo.md).

Every number is written least-significant digit first: 123 + 456 = 579 is the prompt `321+654=`
and the answer `9750` (the sum zero-padded to 4 digits, reversed), then end-of-sequence; reward 1
for an exact match. Reversed digits let a causal model carry left to right. Reversing the
operands too (the notes' prototype kept them in normal order) puts the digits an answer token
needs at the same relative offsets for every answer position, which a RoPE (Llama) model learns
in a few hundred steps; with normal-order operands the same model was still at ~0% after 2,500
(measured with both our learner and HF's Llama, 2026-11-25).
The privileged hint for the self-teacher is the reference answer placed before the response
framing: `321+654|9750=` followed by the student's rollout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TOKENS = ["<pad>", "<eos>", *"0123456789", "+", "=", "|", "<bos>"]


class CharTokenizer:
    """One token per character of the task alphabet (16 ids, no merges)."""

    def __init__(self) -> None:
        self.ids = {token: i for i, token in enumerate(TOKENS)}
        self.pad_id = self.ids["<pad>"]
        self.eos_id = self.ids["<eos>"]
        self.bos_id = self.ids["<bos>"]
        self.vocab_size = len(TOKENS)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[ch] for ch in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the task alphabet {TOKENS}") from None

    def decode(self, ids: list[int]) -> str:
        return "".join(TOKENS[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id))


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def question(self) -> str:
        """Both operands zero-padded to 3 digits, least-significant digit first."""
        return f"{self.a:03d}"[::-1] + "+" + f"{self.b:03d}"[::-1]

    @property
    def answer(self) -> str:
        """The sum, zero-padded to 4 digits, least-significant digit first."""
        return f"{self.a + self.b:04d}"[::-1]


def sample_problems(count: int, seed: int) -> list[AdditionProblem]:
    rng = random.Random(seed)
    return [AdditionProblem(rng.randrange(1000), rng.randrange(1000)) for _ in range(count)]


def student_prompt(tokenizer: CharTokenizer, problem: AdditionProblem) -> list[int]:
    return [tokenizer.bos_id, *tokenizer.encode(problem.question + "=")]


def teacher_prompt(tokenizer: CharTokenizer, problem: AdditionProblem, hint: str) -> list[int]:
    """The student's prompt with the privileged hint before the response framing."""
    return [tokenizer.bos_id, *tokenizer.encode(f"{problem.question}|{hint}=")]


def answer_ids(tokenizer: CharTokenizer, answer: str) -> list[int]:
    """The ids a correct response has: `answer` (an `AdditionProblem.answer`, the reversed sum
    as a dataset row's answer holds it) then end-of-sequence."""
    return [*tokenizer.encode(answer), tokenizer.eos_id]


def exact_match_reward(tokenizer: CharTokenizer, answer: str, response: list[int]) -> float:
    """1.0 when the response ids are `answer_ids(tokenizer, answer)` exactly, else 0.0."""
    return float(list(response) == answer_ids(tokenizer, answer))
