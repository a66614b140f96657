"""The self-teacher's context (spec §2): question + privileged hint in the user turn, then the
student's own rollout tokens, scored by teacher forcing.

A :class:`TeacherContextBuilder` needs only a *prompt renderer*: ``render(user_text) -> ids``,
the token ids of a one-user-turn conversation up to and including the start of the assistant
turn (the generation prompt). :func:`hf_chat_renderer` makes one from a Hugging Face tokenizer's
chat template; a task without a chat template (the CPU demo) passes its own callable. The
student's prompt must come from the same renderer, so that student and teacher differ only in
the user text. The rollout is spliced in as *token ids*, never re-tokenised text, so the teacher
scores exactly the tokens the student sampled.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "RLSD_TEACHER_TEMPLATE",
    "SDPO_PAPER_TEACHER_TEMPLATE",
    "SDPO_TEACHER_TEMPLATE",
    "TeacherContextBuilder",
    "TeacherSequence",
    "check_teacher_template",
    "hf_chat_renderer",
    "hf_text_truncator",
    "remove_thinking",
]

PromptRenderer = Callable[[str], Sequence[int]]
TextTruncator = Callable[[str, int], str]

# The reference recipe's teacher template (teacher_hint_self_distill.jinja), spec §2.
RLSD_TEACHER_TEMPLATE = (
    "{question}\n\n"
    "Here is a reference solution:\n"
    "{answer}\n\n"
    "After understanding the reference solution, please try to solve this problem using your own "
    "approach below. You FIRST think about the reasoning process as an internal monologue enclosed "
    "within <thought> </thought> tags. The final answer MUST be enclosed within <answer> </answer> tags."
)
# Official SDPO (lasgroup/SDPO actor.yaml) reprompt_template + solution_template, without feedback;
# {question} is its {prompt}: the student's own user text (TeacherContextBuilder.student_text).
SDPO_TEACHER_TEMPLATE = "{question}\nCorrect solution:\n\n{solution}\n\nCorrectly solve the original question."
# The RLSD paper's SDPO run (iie-ycx/RLSD@93e46f7 examples/visual_rl/format_prompt/sdpo_teacher.jinja,
# rendered by jinja2 defaults after .strip()): {question} the raw question; {correct} and {incorrect}
# each "\n<text>\n" for a demonstration and "" for none (the jinja's `{% if %}` blocks keep their
# newlines, the headers stay): `TeacherContextBuilder.build_sdpo_paper`.
SDPO_PAPER_TEACHER_TEMPLATE = (
    "Problem:\n{question}\n\n"
    "Correct solution:\n{correct}\n\n"
    "The following is feedback from your unsuccessful earlier attempt:\n{incorrect}\n\n"
    "Correctly solve the original question."
)


def _template_fields(template: str, allowed: set[str], required: str, name: str) -> None:
    literal_braces = "write literal braces as {{ }}"
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:  # an unmatched brace
        raise ValueError(f"{name} {template[:80]!r} is not a format string ({exc}); {literal_braces}.") from None
    if required not in fields or not fields <= allowed:
        raise ValueError(f"{name} has placeholders {sorted(fields)}; it must use {{{required}}} and only "
                         f"{sorted('{' + a + '}' for a in allowed)} ({literal_braces}).")


def check_teacher_template(template: str, name: str = "template") -> None:
    """Raise ValueError, naming ``name``, unless ``template`` is a usable RLSD / OPSD teacher
    template: a format string with ``{answer}`` (the hint) and at most ``{question}`` besides."""
    _template_fields(template, {"question", "answer"}, "answer", name)


@dataclass(frozen=True)
class TeacherSequence:
    """One teacher input: ``input_ids = prompt_ids + response_ids``.

    The rollout token ``j`` sits at ``response_start + j``; the teacher's logits at position
    ``response_start + j − 1`` predict it (see :attr:`logit_positions`). ``has_teacher`` is False
    for an SDPO sample without a successful sibling: its distillation weight must be 0.
    """

    input_ids: list[int]
    response_start: int
    response_length: int
    has_teacher: bool = True
    # The prompt's images (`models.vision_language.ImageInputs`), the student's own; None: text only.
    images: Any = field(default=None, compare=False)

    @property
    def logit_positions(self) -> list[int]:
        return list(range(self.response_start - 1, self.response_start - 1 + self.response_length))


def hf_chat_renderer(tokenizer: Any, *, system_prompt: str | None = None,
                     chat_template_kwargs: dict[str, Any] | None = None,
                     image_placeholder: str | None = None) -> PromptRenderer:
    """Renderer from a HF tokenizer's chat template: ``[system?, user]`` + generation prompt, as ids.

    Renders to text and encodes with ``add_special_tokens=False`` (the template already holds
    BOS/role tokens), as the reference recipe does. ``chat_template_kwargs`` (e.g.
    ``enable_thinking``) must match the student prompt's. With ``image_placeholder`` (``<image>``,
    vision-language data), a user text holding it becomes a content list, each placeholder a
    ``{"type": "image"}`` item, as veRL builds it, so that the template renders the model's
    image token there (once per image: ``data.images.expand_image_tokens`` repeats it).
    """
    kwargs = dict(chat_template_kwargs or {})
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def content(user_text: str) -> str | list[dict[str, str]]:
        if image_placeholder is None or image_placeholder not in user_text:
            return user_text
        items: list[dict[str, str]] = []
        for i, piece in enumerate(user_text.split(image_placeholder)):
            if i:
                items.append({"type": "image"})
            if piece:
                items.append({"type": "text", "text": piece})
        return items

    def render(user_text: str) -> list[int]:
        messages = prefix + [{"role": "user", "content": content(user_text)}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        return list(tokenizer.encode(text, add_special_tokens=False))

    return render


def hf_text_truncator(tokenizer: Any) -> TextTruncator:
    """``truncate(text, max_tokens)``: keep the first ``max_tokens`` tokens (decoded, stripped)."""

    def truncate(text: str, max_tokens: int) -> str:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True).strip()

    return truncate


def remove_thinking(text: str, tag: str = "think") -> str:
    """Drop ``<tag>…</tag>`` spans (and the whitespace after them) from a demonstration.

    SDPO's ``remove_thinking_from_demonstration`` (default on) shows the teacher only the
    sibling's final answer part; the RLSD recipe's format uses ``tag="thought"``.
    """
    return re.sub(rf"<{re.escape(tag)}>.*?</{re.escape(tag)}>\s*", "", text, flags=re.DOTALL)


class TeacherContextBuilder:
    """Builds teacher sequences for RLSD/OPSD (dataset hint) and SDPO (sibling hint: official SDPO's
    ``sdpo_template``, or the RLSD paper's run's fixed :data:`SDPO_PAPER_TEACHER_TEMPLATE`).

    ``render_prompt(user_text) -> ids`` renders the user turn through the assistant-turn
    start, so the hint always sits in the user turn, before the assistant turn. A hint longer
    than ``max_reference_tokens`` is cut with ``truncate_text(text, max_tokens)`` (recipe:
    12,000); pass ``max_reference_tokens=None`` when the task has no truncator. ``template``
    uses ``{question}``/``{answer}``, ``sdpo_template`` ``{question}``/``{solution}``, where SDPO's
    ``{question}`` is the student's user text: ``student_template`` (the dataset's, ``{question}``
    filled with the raw question) as official SDPO reprompts with the student's last user message.
    With ``image_tokens`` (a vision-language model: its image token id and spatial merge size),
    the ``images`` given to ``build`` / ``build_sdpo`` (the student prompt's) go with the teacher
    sequence, each image's placeholder in the rendered prompt (from the question's ``<image>``)
    repeated once per image embedding, as in the student prompt.
    """

    def __init__(self, render_prompt: PromptRenderer, *, truncate_text: TextTruncator | None = None,
                 max_reference_tokens: int | None = 12_000, template: str = RLSD_TEACHER_TEMPLATE,
                 sdpo_template: str = SDPO_TEACHER_TEMPLATE, student_template: str = "{question}",
                 image_tokens: tuple[int, int] | None = None) -> None:
        if max_reference_tokens is not None and (truncate_text is None or max_reference_tokens <= 0):
            raise ValueError(f"max_reference_tokens={max_reference_tokens} needs a truncate_text "
                             "callable and a positive limit; pass max_reference_tokens=None to disable.")
        check_teacher_template(template)
        _template_fields(sdpo_template, {"question", "solution"}, "solution", "sdpo_template")
        _template_fields(student_template, {"question"}, "question", "student_template")
        self.render_prompt = render_prompt
        self.truncate_text = truncate_text
        self.max_reference_tokens = max_reference_tokens
        self.template = template
        self.sdpo_template = sdpo_template
        self.student_template = student_template
        self.image_tokens = image_tokens

    @classmethod
    def from_hf_tokenizer(cls, tokenizer: Any, *, system_prompt: str | None = None,
                          chat_template_kwargs: dict[str, Any] | None = None, **kwargs) -> "TeacherContextBuilder":
        """Builder on a HF tokenizer's chat template, truncating hints by its tokens."""
        render = hf_chat_renderer(tokenizer, system_prompt=system_prompt, chat_template_kwargs=chat_template_kwargs)
        return cls(render, truncate_text=hf_text_truncator(tokenizer), **kwargs)

    def _limit(self, text: str) -> str:
        if self.max_reference_tokens is None:
            return text
        return self.truncate_text(text, self.max_reference_tokens)

    def student_text(self, question: str) -> str:
        """The student's user text for the raw ``question`` (what its prompt renders)."""
        return self.student_template.format(question=question.strip())

    def hint_text(self, question: str, answer: str, reference_solution: str | None = None) -> str:
        """The teacher's user text: the template filled with the raw question and the hint.

        The hint is ``reference_solution`` when given and non-blank, else ``answer`` (the
        recipe's fallback), truncated to ``max_reference_tokens``; both are stripped.
        """
        hint = reference_solution if reference_solution and reference_solution.strip() else answer
        return self.template.format(question=question.strip(), answer=self._limit(str(hint)).strip())

    def build(self, question: str, answer: str, response_ids: Sequence[int] | torch.Tensor, *,
              reference_solution: str | None = None, images: Any = None) -> TeacherSequence:
        """Teacher sequence for RLSD / OPSD: rendered hint prompt + the rollout's ids.

        ``question`` is the raw problem text (not the student's formatted prompt), ``answer`` the
        dataset answer, ``response_ids`` the rollout's unpadded token ids, ``images`` the student
        prompt's (``ImageInputs``; None: text only).
        """
        return self._splice(self.render_prompt(self.hint_text(question, answer, reference_solution)),
                            response_ids, has_teacher=True, images=images)

    def build_sdpo(self, question: str, response_ids: Sequence[int] | torch.Tensor, *,
                   solution: str | None, fallback_answer: str | None = None, images: Any = None) -> TeacherSequence:
        """Teacher sequence for SDPO: the student's prompt plus a successful sibling's ``solution`` text.

        ``question`` is the raw question; the SDPO prompt starts from the student's user text
        (:meth:`student_text`), as official SDPO's ``{prompt}`` is the student's last user
        message, task instructions included. With no successful sibling (``solution`` None or
        blank) the default follows official SDPO: the teacher sees the student's prompt with no
        hint (no privileged signal to distil) and ``has_teacher=False`` tells the loss to give
        the sample weight 0. Passing
        ``fallback_answer`` instead uses the dataset answer with the RLSD ``template`` (an
        OPSD-style teacher; this mixes methods, so it is opt-in).
        """
        prompt = self.student_text(question)
        if solution is not None and solution.strip():
            text = self.sdpo_template.format(question=prompt, solution=self._limit(solution).strip())
            return self._splice(self.render_prompt(text), response_ids, has_teacher=True, images=images)
        if fallback_answer is not None:
            return self.build(question, fallback_answer, response_ids, images=images)
        return self._splice(self.render_prompt(prompt), response_ids, has_teacher=False, images=images)

    def build_sdpo_paper(self, question: str, response_ids: Sequence[int] | torch.Tensor, *, correct: str | None,
                         incorrect: str | None, images: Any = None) -> TeacherSequence:
        """Teacher sequence for the RLSD paper's SDPO run: :data:`SDPO_PAPER_TEACHER_TEMPLATE` with
        the raw ``question`` (the authors' ``teacher_question``, not the student's text) and a
        correct and an incorrect sibling's text, each cut to ``max_reference_tokens`` and stripped.

        A missing one (None or blank) leaves its header with an empty block, as the authors'
        template does; the sample has a teacher when at least one is given.
        """
        def block(text: str | None) -> str:
            text = self._limit(text.strip()).strip() if text is not None and text.strip() else ""  # theirs: strip, cut
            return f"\n{text}\n" if text else ""

        correct_block, incorrect_block = block(correct), block(incorrect)
        text = SDPO_PAPER_TEACHER_TEMPLATE.format(question=question.strip(), correct=correct_block,
                                                  incorrect=incorrect_block)
        return self._splice(self.render_prompt(text), response_ids, has_teacher=bool(correct_block or incorrect_block),
                            images=images)

    def _splice(self, prompt_ids: Sequence[int], response_ids: Sequence[int] | torch.Tensor, *,
                has_teacher: bool, images: Any = None) -> TeacherSequence:
        prompt = [int(t) for t in prompt_ids]
        response = response_ids.tolist() if isinstance(response_ids, torch.Tensor) else [int(t) for t in response_ids]
        if not prompt:
            raise ValueError("render_prompt returned no tokens; the teacher needs a prompt before the rollout.")
        if images is not None:
            if self.image_tokens is None:
                raise ValueError("images given to a teacher-context builder made without image_tokens (a text "
                                 "dataset); build it with the vision model's image token and merge size")
            from rlsd_megatron.data.images import expand_image_tokens, image_token_counts

            token_id, merge = self.image_tokens
            prompt = expand_image_tokens(prompt, image_token_counts(images.image_grid_thw, merge), token_id)
        return TeacherSequence(prompt + response, response_start=len(prompt), response_length=len(response),
                               has_teacher=has_teacher, images=images)

