"""Hugging Face model directories: streamed safetensors reading, sharded writing, tokenizer files.

Reading opens every `*.safetensors` file of a model (one file, or the shards named by
`model.safetensors.index.json`) as a memory map and materialises one tensor per request.
Writing fills `model-0000k-of-0000n.safetensors` shards of at most `max_shard_bytes` in the
order tensors arrive and writes `model.safetensors.index.json`, the layout `transformers` and
SGLang load; memory is one shard plus what the producer holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

from rlsd_megatron.checkpoint.directory import CheckpointError
from rlsd_megatron.dtypes import of_safetensors

INDEX_FILE = "model.safetensors.index.json"
# Everything a tokenizer / generation setup may need; copied when present. A VL model's image
# processor settings too (flat in preprocessor_config.json, or nested in the processor_config.json
# transformers 5 saves): a checkpoint's assets then process images as the model's own processor.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
)


class HFSafetensors:
    """Lazy access to the tensors of an HF model directory by name: the files' names, or
    `rename(file name)` (e.g. transformers' module names of a checkpoint that stores others)."""

    def __init__(self, hf_dir: str | Path, rename: Callable[[str], str] | None = None):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            found = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = (" (found PyTorch .bin weights: re-save them with model.save_pretrained(dir, "
                    "safe_serialization=True))" if found else "")
            raise CheckpointError(f"no *.safetensors weights in {self.dir}{hint}")
        self._handles = {}
        self._file_of: dict[str, str] = {}
        self._stored: dict[str, str] = {}  # name -> the name in the file
        rename = rename or (lambda name: name)
        for file in files:
            path = self.dir / file
            if not path.is_file():
                raise CheckpointError(f"{INDEX_FILE} names {file}, which is not in {self.dir} (incomplete download?)")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); re-download it") from exc
            self._handles[file] = handle
            for name in handle.keys():
                self._file_of[rename(name)] = file
                self._stored[rename(name)] = name
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self._stored.values()))
            if lost:
                raise CheckpointError(f"{INDEX_FILE} lists tensors its files lack: {lost[:5]}")

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._file_of[name]].get_slice(self._stored[name]).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._handles[self._file_of[name]].get_slice(self._stored[name]).get_dtype()
        entry = of_safetensors(code)
        if entry is None:
            raise CheckpointError(f"HF tensor {name!r} has dtype {code}; only F32/BF16/F16 are supported")
        return entry.torch_dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor `name` (raises KeyError when absent, as `hf_to_megatron` expects)."""
        file = self._file_of[name]
        return self._handles[file].get_tensor(self._stored[name])


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / bytes → bytes."""
    if isinstance(text, int):
        return text
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            return int(float(upper[: -len(unit)]) * factor)
    return int(upper)


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors (in arrival order) into consecutive shards of at most `max_shard_bytes`
    (a tensor larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_safetensors_shards(out_dir: str | Path, tensors: Iterable[tuple[str, torch.Tensor]],
                             shards: list[list[str]]) -> dict[str, str]:
    """Write tensors arriving in the order of `shards` into one safetensors file per shard and
    the index; returns the weight map."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    count = len(shards)
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    weight_map: dict[str, str] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}
    current = 0
    for name, tensor in tensors:
        if shard_of.get(name) != current:
            raise CheckpointError(f"HF tensor {name!r} arrived out of the planned order (shard {current + 1})")
        pending[name] = tensor.contiguous()
        total += tensor.numel() * tensor.element_size()
        if len(pending) == len(shards[current]):
            save_file(pending, str(out_dir / files[current]), metadata={"format": "pt"})
            weight_map.update({n: files[current] for n in pending})
            pending, current = {}, current + 1
    if current != count:
        raise CheckpointError(f"only {current} of {count} safetensors shards were filled; the tensor stream ended early")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer / generation files present in `src` to `dst`; returns their names."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
