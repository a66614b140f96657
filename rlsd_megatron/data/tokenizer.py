"""The chat tokenizer, from a local directory only (``data.tokenizer_dir``).

Training nodes usually have no internet and a run must not change because a hub repository
did, so a hub id is never fetched: download the tokenizer once (``huggingface-cli download
ORG/MODEL --include 'tokenizer*' 'chat_template*' --local-dir DIR``) and point at DIR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlsd_megatron.data.readers import DataError

__all__ = ["TOKENIZER_FILES", "check_tokenizer_dir", "load_chat_tokenizer"]

# Any one of these makes a directory loadable by AutoTokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def check_tokenizer_dir(tokenizer_dir: str | Path | None) -> Path:
    """The checks of ``data.tokenizer_dir`` that need no loading (set, a directory, holding
    tokenizer files); returns the directory. Raises :class:`DataError`. Cheap: the trainer runs
    them before it builds the model."""
    if not tokenizer_dir:
        raise DataError("data.tokenizer_dir is not set; prompt files need a local tokenizer directory with a "
                        "chat template (the model's HF directory works): set data.tokenizer_dir=DIR.")
    path = Path(tokenizer_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data.tokenizer_dir={str(tokenizer_dir)!r} is not a directory. Tokenizers are only loaded "
                        "from a local directory, never from the hub: download it first, e.g. `huggingface-cli "
                        "download ORG/MODEL --include 'tokenizer*' --local-dir DIR`, and set data.tokenizer_dir=DIR.")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())[:20]
        raise DataError(f"data.tokenizer_dir={str(tokenizer_dir)!r} has no tokenizer files (looked for "
                        f"{', '.join(TOKENIZER_FILES)}; found {found}); point it at the model's HF directory.")
    return path


def load_chat_tokenizer(tokenizer_dir: str | Path | None) -> Any:
    """``AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)``, checked.

    Raises :class:`DataError` when ``tokenizer_dir`` is unset, not a directory, holds no
    tokenizer files, cannot be loaded, or has no chat template (prompts are rendered through
    it, see :func:`rlsd_megatron.data.teacher_context.hf_chat_renderer`).
    """
    path = check_tokenizer_dir(tokenizer_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise DataError(f"data.tokenizer_dir={str(tokenizer_dir)!r}: AutoTokenizer cannot load it "
                        f"({type(exc).__name__}: {exc}).") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.tokenizer_dir={str(tokenizer_dir)!r} has no chat template (no 'chat_template' in "
                        "tokenizer_config.json and no chat_template.jinja); use the instruct model's tokenizer "
                        "or add a template.")
    return tokenizer
