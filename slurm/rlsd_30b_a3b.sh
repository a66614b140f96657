#!/bin/bash
# RLSD on Qwen3-30B-A3B (examples/configs/rlsd_qwen3_30b_a3b.yaml): 4 nodes x 8 H100 80GB.
#
#   bash slurm/rlsd_30b_a3b.sh --dry-run    # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen3-30B-A3B RLSD_INIT_CKPT=/ckpt/qwen3-30b-a3b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_30b_a3b.sh [section.key=value ...]  # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh.
#
# Layout: TP=4 inside each node (divides the 32 heads and 4 KV groups; the experts are TP=4 as
# well), EP=8: each GPU holds 16 of every layer's 128 experts split 4 ways, so tp x ep = 32 GPUs
# hold one copy of the experts while the dense part (attention, embeddings: 1.5B) is replicated
# over dp=8. Sequence parallelism, distributed optimizer (the dense part's state sharded over
# dp=8; the experts' over expert-dp = dp/ep = 1, i.e. not at all: each GPU already holds only
# 1/32 of them), full recomputation, bf16. One SGLang engine per learner replica (engine_tp=4:
# 15.3 GB of the 61 GB of weights per GPU) at mem_fraction_static=0.6, asleep while the
# learner trains.
#
# Why 4 nodes: on 2 nodes (tp=4, ep=4) each GPU holds 1/16 of the experts, whose fp32 main
# weights and Adam moments (21.3 GiB per GPU) cannot shard (expert-dp = 1), and the rollout
# phase needs 85.7 GiB > 74 with the engine at 0.6 of the GPU (73.7 at 0.45: no headroom and
# ~20 GiB of KV cache). 4 nodes halve the expert state and leave 5.7 GiB of headroom.
# The planner assumes tokens spread evenly over the experts (its MoE dispatcher row); the
# load-balancing loss keeps the released model's coefficient (0.001, pooled over every layer as
# transformers defines it, which needs PP=1 and CP=1: learner/moe_aux_loss.py).
#
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3_30b_a3b.yaml --world-size 32
#   model: 30.53B parameters (qwen3_moe, 48 layers, hidden 2048, 32 heads / 4 KV groups, 128 experts (top-8) of width 768, vocab 151936) from the model.* fields of examples/configs/rlsd_qwen3_30b_a3b.yaml
#   layout: tp=4 pp=1 cp=1 ep=8 dp=8 sp distopt recompute=full
#   component                           GiB/GPU
#   weights                                2.41
#   gradients (fp32)                       4.81
#   optimizer (fp32 main + Adam)          10.66
#   activations (in flight)                2.64
#   logits + ops workspace                 3.48
#   MoE dispatcher (one layer)             1.25
#   teacher copy                           2.41
#   distillation (one chunk)               0.00
#   teacher model (OPD)                    0.00
#   KL reference                           0.00
#   rollout engine (awake)                48.00
#   training phase peak                   27.65
#   rollout phase peak                    68.28
#   budget                                74.00
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_qwen3_30b_a3b.yaml --world-size 16 parallel.ep=4
#   rlsd-plan: error: the layout does not fit in GPU memory:
#   layout: tp=4 pp=1 cp=1 ep=4 dp=4 sp distopt recompute=full
#   optimizer (fp32 main + Adam)          21.33
#   training phase peak                   45.07
#   rollout phase peak                    85.70
#   DOES NOT FIT
#
#SBATCH --job-name=rlsd-30b-a3b
#SBATCH --nodes=4
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
