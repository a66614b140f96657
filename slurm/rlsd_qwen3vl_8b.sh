#!/bin/bash
# RLSD on Qwen3-VL-8B-Instruct, the paper's model (examples/configs/rlsd_qwen3vl_8b.yaml): 1 node x 8 H100 80GB.
#
#   bash slurm/rlsd_qwen3vl_8b.sh --dry-run  # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen3-VL-8B-Instruct RLSD_INIT_CKPT=/ckpt/qwen3-vl-8b-mcore RLSD_DATA=/data/visual-math \
#     sbatch slurm/rlsd_qwen3vl_8b.sh [section.key=value ...]  # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh. RLSD_MODEL must be the full HF
# directory: besides config.json and the weights, SGLang builds its multimodal processor from its
# preprocessor_config.json and tokenizer (data.tokenizer_dir=$RLSD_MODEL), and our image processor
# reads the same file. RLSD_DATA's parquet rows are the authors' layout: problem, answer, images.
#
# Layout: TP=4 (NVLink), DP=2 on one node, as the text 8B preset (slurm/rlsd_8b.sh); the ViT
# (0.58B of the 8.77B) runs replicated over TP on the only pipeline stage, DeepStack's three
# decoder layers with it. Sequence parallelism, distributed optimizer, bf16, selective recompute
# (full recompute cannot rerun DeepStack's layers). The vision tower trains, as in the authors'
# recipe, and keeps its activations per image: at data.max_pixels = 1048576 (1024 image tokens)
# the training phase has room for 2 images per sequence; data with more images per prompt needs
# model.freeze_vision_tower=true (4 images: 59.75 GiB) or smaller images. One SGLang engine with
# engine_tp=4 on each model-parallel group's GPUs at 0.85 of the memory while the learner is
# offloaded (train.offload=copy); without offload the engine's 0.5 does not fit beside the learner.
# TP=2 does not fit the training phase.
#
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 1
#   model: 8.77B parameters (qwen3, 36 layers, hidden 4096, 32 heads / 8 KV groups, ffn 12288, vocab 151936, a 576.39M qwen3_vl vision tower) from the model.* fields of examples/configs/rlsd_qwen3vl_8b.yaml
#   layout: tp=4 pp=1 cp=1 dp=2 sp distopt recompute=selective
#   component                           GiB/GPU
#   weights                                4.89
#   gradients (fp32)                       9.78
#   optimizer (fp32 main + Adam)          14.66
#   activations (in flight)               31.33
#   logits + ops workspace                 3.48
#   teacher copy                           4.89
#   rollout engine (awake)                68.00
#   training phase peak                   69.03
#   rollout phase peak                    72.89
#   budget                                74.00
#   rollout phase: the learner's weights, gradients and optimizer state off the GPU (train.offload)
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 2
#   activations (in flight)               35.24
#   training phase peak                   72.94
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 3
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   activations (in flight)               39.15
#   training phase peak                   76.85
#   DOES NOT FIT
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 4 \
#         model.freeze_vision_tower=true
#   activations (in flight)               27.42
#   training phase peak                   59.75
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 1 \
#         train.offload=none rollout.mem_fraction_static=0.5
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   rollout phase peak                    74.22
#   DOES NOT FIT
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3vl_8b.yaml --world-size 8 --images-per-sequence 1 \
#         parallel.tp=2 rollout.engine_tp=2
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   layout: tp=2 pp=1 cp=1 dp=4 sp distopt recompute=selective
#   training phase peak                  113.58
#   DOES NOT FIT
#
#SBATCH --job-name=rlsd-qwen3vl-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --signal: 15 min before the limit, enough for one step plus a checkpoint save (SLURM may
# send it up to 60 s early or late). Add --partition / --account as your cluster requires.
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: the repository is then the
# submission directory (submit from its root) unless RLSD_HOME names it.
RLSD_HOME=${RLSD_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $RLSD_HOME/slurm/common.sh ]] || RLSD_HOME=${SLURM_SUBMIT_DIR:-$PWD}
[[ -f $RLSD_HOME/slurm/common.sh ]] || { echo "rlsd: no slurm/common.sh under $RLSD_HOME: submit from the repository root or set RLSD_HOME" >&2; exit 1; }
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_qwen3vl_8b.yaml
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
