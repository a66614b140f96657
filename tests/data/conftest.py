"""A tiny chat tokenizer built offline: a byte-level BPE trained on a few strings, saved with a
simple ChatML-style Jinja template, so tests load it exactly as users load a model's directory."""

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Qwen2-VL's way of rendering an image content item, on the template above.
VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VL_SPECIAL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


def build_tokenizer(directory, *, chat_template=CHAT_TEMPLATE, extra_special_tokens=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<pad>", "<|im_start|>", "<|im_end|>",
                                                                    *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["What is 1+1? The answer is 2.", "Solve x^2 = 4 for x > 0.",
                             "<thought> think </thought> <answer> 2 </answer>", "Here is a reference solution:"],
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<|im_end|>")
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from rlsd_megatron.data import load_chat_tokenizer

    return load_chat_tokenizer(tokenizer_dir)


def build_vl_tokenizer(directory):
    """`build_tokenizer` with Qwen2-VL's vision tokens and a template that renders image items."""
    return build_tokenizer(directory, chat_template=VL_CHAT_TEMPLATE, extra_special_tokens=VL_SPECIAL_TOKENS)
