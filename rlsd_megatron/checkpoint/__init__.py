"""Model-weight checkpoints in megatron.core.dist_checkpointing's torch_dist format, and the
Hugging Face converters built on them.

- `model_checkpoint`: collective `save_checkpoint` / `load_checkpoint` of this rank's model
  chunks at any TP/PP (resharded on load), extensible with `extra_sharded` / `extra_common`.
- `directory`: the on-disk layout (Megatron-LM's `iter_XXXXXXX` / `release` directories and
  tracker), `rlsd_checkpoint.json`, atomic publication.
- `streaming`: one process streams canonical tensors into / out of a checkpoint without
  building the model (used by the converters).
- `convert`, `hf_files`, `fp8_export`: HF ⇄ Megatron conversion (`tools/convert_*.py`).

megatron-core, safetensors and modelopt are imported inside the functions that need them.
"""

from rlsd_megatron.checkpoint.directory import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointInfo,
    latest_checkpoint,
    read_checkpoint_info,
    resolve_checkpoint_dir,
)
from rlsd_megatron.checkpoint.model_checkpoint import (
    LoadedCheckpoint,
    load_checkpoint,
    model_sharded_state_dict,
    save_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "model_sharded_state_dict",
    "read_checkpoint_info",
    "resolve_checkpoint_dir",
    "save_checkpoint",
]
