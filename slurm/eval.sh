#!/bin/bash
# rlsd-eval on one GPU node: SGLang engines on its GPUs, data parallel (rlsd_megatron/eval).
#
#   bash slurm/eval.sh --dry-run                               # anywhere: the command it would run
#   RLSD_EVAL_MODEL=checkpoints/rlsd_qwen3vl_8b-Qwen3-VL-8B-Instruct RLSD_EVAL_OUT=logs/eval/rlsd \
#     RLSD_EVAL_BENCHMARKS=examples/benchmarks/vision_language.yaml RLSD_MODEL=/ckpt/Qwen3-VL-8B-Instruct \
#     sbatch slurm/eval.sh [rlsd-eval options ...]           # from the repository root
#
# Environment:
#   RLSD_EVAL_MODEL       (required) a Megatron checkpoint, any TP/PP (a run's checkpoint.dir: its
#                         latest iteration), or an HF directory (the base model)
#   RLSD_EVAL_BENCHMARKS  (required) the benchmark list (examples/benchmarks/*.yaml)
#   RLSD_EVAL_OUT         (required) rlsd-eval's --out: a requeued or resubmitted job skips the
#                         benchmarks it finished
#   RLSD_MODEL            the HF directory whose tokenizer (and image processor files) the prompts
#                         use (--tokenizer); default: the checkpoint's own
#   RLSD_EVAL_ENGINE_TP   GPUs per SGLang engine (default 1: an 8B model fits one GPU); the node's
#                         GPUs / RLSD_EVAL_ENGINE_TP engines share the problems
#   RLSD_PYTHON, RLSD_GPUS_PER_NODE as in slurm/common.sh
# slurm/compare_methods.py submits one of these per trained run, after it (--dependency=afterok).
#
#SBATCH --job-name=rlsd-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

die() {
    echo "rlsd-eval job: error: $*" >&2
    exit 1
}

# As the training scripts: the repository is the submission directory unless RLSD_HOME names it.
RLSD_HOME=${RLSD_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $RLSD_HOME/slurm/common.sh ]] || RLSD_HOME=${SLURM_SUBMIT_DIR:-$PWD}
cd "$RLSD_HOME" || die "cannot cd to RLSD_HOME=$RLSD_HOME"

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
model=${RLSD_EVAL_MODEL:-}
benchmarks=${RLSD_EVAL_BENCHMARKS:-}
out=${RLSD_EVAL_OUT:-}
if ((dry_run)); then  # the command's shape without the inputs
    model=${model:-<RLSD_EVAL_MODEL>} benchmarks=${benchmarks:-<RLSD_EVAL_BENCHMARKS>} out=${out:-<RLSD_EVAL_OUT>}
else
    [[ -n $model ]] || die "set RLSD_EVAL_MODEL to a Megatron checkpoint or an HF directory"
    [[ -n $benchmarks ]] || die "set RLSD_EVAL_BENCHMARKS to a benchmark list (examples/benchmarks/*.yaml)"
    [[ -n $out ]] || die "set RLSD_EVAL_OUT to the results directory"
    [[ -e $model ]] || die "RLSD_EVAL_MODEL=$model does not exist (relative paths start at $RLSD_HOME)"
    [[ -f $benchmarks ]] || die "RLSD_EVAL_BENCHMARKS=$benchmarks does not exist"
fi
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"  # functions only
python=$(rlsd_python)
gpus=${RLSD_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
engine_tp=${RLSD_EVAL_ENGINE_TP:-1}
[[ $gpus =~ ^[1-9][0-9]*$ && $engine_tp =~ ^[1-9][0-9]*$ ]] && ((gpus % engine_tp == 0)) ||
    die "RLSD_EVAL_ENGINE_TP=$engine_tp must divide the node's $gpus GPUs"

command=("$python" -m rlsd_megatron.eval --model "$model" --benchmarks "$benchmarks" --out "$out"
    --backend sglang --engines $((gpus / engine_tp)) --engine-tp "$engine_tp" --no-progress)
[[ -z ${RLSD_MODEL:-} ]] || command+=(--tokenizer "$RLSD_MODEL")
command+=("$@")
echo "rlsd-eval job: ${command[*]}"
((dry_run)) && exit 0
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1
exec "${command[@]}"
