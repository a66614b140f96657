"""On-disk layout of rlsd_megatron checkpoints, their metadata file and atomic publication.

A checkpoint root holds one directory per saved iteration and Megatron-LM's tracker file, so
Megatron-LM (`--load ROOT`) and our trainer find the newest complete one the same way:

    ROOT/
      latest_checkpointed_iteration.txt   "release" (converted weights) or the iteration number
      release/ | iter_0000100/            one megatron.core.dist_checkpointing (torch_dist) checkpoint
        metadata.json, .metadata, __*_*.distcp    written by megatron.core.dist_checkpointing
        rlsd_checkpoint.json              ours: format version, iteration, model config, layout
        hf_assets/                        tokenizer files and the source config.json (converter only)

A directory is written under a temporary name and renamed into place only when complete, and the
tracker is replaced atomically after that, so a crash mid-save leaves the previous checkpoint
(and the tracker pointing at it) untouched; leftovers are `.partial` directories.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlsd_megatron.config import ConfigError, ModelConfig

FORMAT_VERSION = 1
INFO_FILE = "rlsd_checkpoint.json"
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # Megatron-LM's name
HF_ASSETS_DIR = "hf_assets"
PARTIAL_SUFFIX = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model it is loaded into."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """What reading or writing a checkpoint may raise: torch.distributed.checkpoint wraps the
    failures of its ranks in a `CheckpointException`, which derives from BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def describe_failure(exc: BaseException) -> str:
    """`Type: message` of the underlying error, unwrapping torch DCP's per-rank failures."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        return describe_failure(inner[0] if isinstance(inner, tuple) else inner)
    return f"{type(exc).__name__}: {str(exc)[:500]}"


@dataclass
class CheckpointInfo:
    """What `rlsd_checkpoint.json` records about one checkpoint directory."""

    model: dict[str, Any]  # ModelConfig fields
    iteration: int = 0
    release: bool = False  # converted weights rather than a training state
    format_version: int = FORMAT_VERSION
    layout: dict[str, Any] = field(default_factory=dict)  # tp / pp / vpp it was written for
    params_dtype: str | None = None
    config: dict[str, Any] | None = None  # the full training config, when a trainer saved it
    source: dict[str, Any] = field(default_factory=dict)  # e.g. the HF directory it came from
    created: str = ""

    def model_config(self) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in self.model.items() if k in known})


def iteration_dir_name(iteration: int, release: bool = False) -> str:
    """Megatron-LM's directory name for an iteration: `iter_0000100`, or `release`."""
    return "release" if release else f"iter_{iteration:07d}"


def write_info(checkpoint_dir: str | Path, info: CheckpointInfo) -> None:
    info.created = info.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _atomic_write_text(Path(checkpoint_dir) / INFO_FILE, json.dumps(dataclasses.asdict(info), indent=2) + "\n")


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """The metadata of a checkpoint (a root with a tracker, or one iteration directory)."""
    checkpoint_dir = resolve_checkpoint_dir(path)
    file = checkpoint_dir / INFO_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{checkpoint_dir} has no {INFO_FILE}: it was not written by rlsd_megatron (a Megatron-LM "
            f"checkpoint?). Pass the architecture explicitly (convert_megatron_to_hf.py --hf-config)"
        )
    raw = json.loads(file.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version={version!r}, this rlsd_megatron reads version {FORMAT_VERSION}; "
            f"use the rlsd_megatron release that wrote it"
        )
    known = {f.name for f in dataclasses.fields(CheckpointInfo)}
    return CheckpointInfo(**{k: v for k, v in raw.items() if k in known})


def check_complete(checkpoint_dir: Path) -> None:
    """Raise unless `checkpoint_dir` holds a finished dist checkpoint (both metadata files)."""
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    missing = [name for name in ("metadata.json", ".metadata") if not (checkpoint_dir / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{checkpoint_dir} is not a complete torch_dist checkpoint (missing {', '.join(missing)}); "
            f"the save was interrupted or this is not a checkpoint directory"
        )


def latest_checkpoint(root: str | Path) -> Path | None:
    """The iteration directory the tracker of `root` points at, or None when nothing was saved."""
    root = Path(root)
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return root / "release"
    try:
        return root / iteration_dir_name(int(text))
    except ValueError:
        raise CheckpointError(f"{tracker} holds {text!r}; expected an iteration number or 'release'") from None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint directory, else the latest one under it (a root)."""
    path = Path(path)
    if (path / "metadata.json").is_file() or (path / INFO_FILE).is_file():
        check_complete(path)
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        raise CheckpointError(
            f"{path} is neither a checkpoint directory (no metadata.json) nor a checkpoint root "
            f"(no {TRACKER_FILE}); point at the directory the converter or trainer wrote"
        )
    check_complete(latest)
    return latest


def partial_dir(root: Path, name: str) -> Path:
    """The temporary directory a checkpoint named `name` is written to before publication."""
    return root / f"{name}{PARTIAL_SUFFIX}"


def publish(partial: Path, final: Path, *, tracker_value: str | None) -> None:
    """Move a finished `partial` directory to `final` and point the tracker at it.

    Replacing an existing `final` (re-saving an iteration) moves it aside first; only the
    renames are not atomic together, and each rename is.
    """
    check_complete(partial)
    _fsync_dir(partial)
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(partial, final)
    _fsync_dir(final.parent)
    if tracker_value is not None:
        _atomic_write_text(final.parent / TRACKER_FILE, tracker_value + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_model_matches(info: CheckpointInfo, model: ModelConfig, where: Path) -> None:
    """Raise when the checkpoint's architecture differs from `model` (names every field)."""
    ignore = {"hf_config", "init_method_std", "make_vocab_size_divisible_by"}
    mine = dataclasses.asdict(model)
    theirs = info.model
    diffs = [
        f"{name}: checkpoint {theirs.get(name)!r}, model {mine[name]!r}"
        for name in mine
        if name not in ignore and name in theirs and theirs[name] != mine[name]
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {where} was written for a different model ({'; '.join(diffs)}); "
            f"load it into a model with the same architecture (e.g. model.hf_config of the source)"
        )


def model_config_from_hf_config(path: str | Path) -> ModelConfig:
    """A `ModelConfig` from an HF config.json (for checkpoints without our metadata)."""
    from rlsd_megatron.models.hf_config import model_fields_from_hf

    try:
        return ModelConfig(**model_fields_from_hf(path))
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
