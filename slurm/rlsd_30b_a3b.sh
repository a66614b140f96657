#!/bin/bash
# RLSD on Qwen3-30B-A3B (examples/configs/rlsd_qwen3_30b_a3b.yaml): 2 nodes x 8 H100 80GB.
#
#   bash slurm/rlsd_30b_a3b.sh --dry-run    # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen3-30B-A3B RLSD_INIT_CKPT=/ckpt/qwen3-30b-a3b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_30b_a3b.sh [section.key=value ...]  # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh.
#
# Layout: TP=4 inside each node (divides the 32 heads and 4 KV groups; the experts are TP=4 as
# well), EP=4: each GPU holds 32 of every layer's 128 experts split 4 ways, so tp x ep = 16 GPUs
# hold one copy of the experts while the dense part (attention, embeddings: 1.5B) is replicated
# over dp=4. Sequence parallelism, distributed optimizer (the dense part's state sharded over
# dp=4; the experts' over expert-dp = dp/ep = 1, i.e. not at all: each GPU already holds only
# 1/16 of them), full recomputation, bf16. One SGLang engine per learner replica (engine_tp=4:
# 15.3 GB of the 61 GB of weights per GPU) at mem_fraction_static=0.8 while the learner is
# offloaded (train.offload=copy), asleep while the learner trains.
#
# Why 2 nodes: the experts' fp32 main weights and Adam moments cannot shard at expert-dp = 1
# (21.3 GiB per GPU), which offload moves off the GPU while the engine generates; without
# offload the rollout phase needs 101.7 GiB at this engine share (and 85.7 at 0.6). One node
# (tp=4, ep=2) does not fit the training phase. More nodes add data parallelism
# (`sbatch --nodes=4 slurm/rlsd_30b_a3b.sh`: dp=8, the expert state sharded over expert-dp=2).
# The planner assumes tokens spread evenly over the experts (its MoE dispatcher row); the
# load-balancing loss keeps the released model's coefficient (0.001, pooled over every layer as
# transformers defines it; under PP (and VPP) the stages exchange their routing counts:
# learner/moe_aux_loss.py).
#
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3_30b_a3b.yaml --world-size 16
#   model: 30.53B parameters (qwen3_moe, 48 layers, hidden 2048, 32 heads / 4 KV groups, 128 experts (top-8) of width 768, vocab 151936) from the model.* fields of examples/configs/rlsd_qwen3_30b_a3b.yaml
#   layout: tp=4 pp=1 cp=1 ep=4 dp=4 sp distopt recompute=full
#   component                           GiB/GPU
#   weights                                4.09
#   gradients (fp32)                       8.19
#   optimizer (fp32 main + Adam)          21.33
#   activations (in flight)                2.64
#   logits + ops workspace                 3.48
#   MoE dispatcher (one layer)             1.25
#   teacher copy                           4.09
#   distillation (one chunk)               0.00
#   teacher model (OPD)                    0.00
#   KL reference                           0.00
#   rollout engine (awake)                64.00
#   training phase peak                   45.07
#   rollout phase peak                    68.09
#   budget                                74.00
#   rollout phase: the learner's weights, gradients and optimizer state off the GPU (train.offload)
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3_30b_a3b.yaml --world-size 16 train.offload=none
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   layout: tp=4 pp=1 cp=1 ep=4 dp=4 sp distopt recompute=full
#   training phase peak                   45.07
#   rollout phase peak                   101.70
#   DOES NOT FIT
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3_30b_a3b.yaml --world-size 8 parallel.ep=2
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   layout: tp=4 pp=1 cp=1 ep=2 dp=2 sp distopt recompute=full
#   optimizer (fp32 main + Adam)          42.65
#   training phase peak                   79.89
#   rollout phase peak                    71.47
#   rollout phase: the learner's weights, gradients and optimizer state off the GPU (train.offload)
#   DOES NOT FIT
#
#SBATCH --job-name=rlsd-30b-a3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@1200
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --signal: 20 min before the limit, enough for one step plus a checkpoint save (SLURM may
# send it up to 60 s early or late). Add --partition / --account as your cluster requires.
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: the repository is then the
# submission directory (submit from its root) unless RLSD_HOME names it.
RLSD_HOME=${RLSD_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $RLSD_HOME/slurm/common.sh ]] || RLSD_HOME=${SLURM_SUBMIT_DIR:-$PWD}
[[ -f $RLSD_HOME/slurm/common.sh ]] || { echo "rlsd: no slurm/common.sh under $RLSD_HOME: submit from the repository root or set RLSD_HOME" >&2; exit 1; }
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_qwen3_30b_a3b.yaml
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
