#!/bin/bash
# RLSD on a Qwen2.5-32B-style model (examples/configs/rlsd_32b.yaml): 4 nodes x 8 H100 80GB.
#
#   bash slurm/rlsd_32b.sh --dry-run        # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen2.5-32B RLSD_INIT_CKPT=/ckpt/qwen32b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_32b.sh [section.key=value ...]      # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh.
#
# Layout: TP=8 inside each node (NVLink; 8 divides the 40 heads and 8 KV groups), PP=2 across
# nodes, DP=2; sequence parallelism, distributed optimizer, full activation recomputation
# (without it a 20480-token micro-batch keeps 45 GiB of activations), bf16; SGLang engines
# with engine_tp=8 (8.2 GB of weights per GPU), asleep while the learner trains.
#
# Why 4 nodes: on 2 nodes DP=1, the optimizer state cannot shard (22.9 GiB per GPU) and the
# rollout phase needs 78.2 GiB > 74 with the engine at 0.5 of the GPU. 2 nodes do fit with
# rollout.mem_fraction_static=0.4 (rollout peak 70.15 GiB: 3.9 GiB of headroom, ~24 GiB of KV
# cache per GPU): `sbatch --nodes=2 slurm/rlsd_32b.sh rollout.mem_fraction_static=0.4` is the
# smaller job, at half the generation throughput. 4 nodes halve the optimizer state, leave
# 7.3 GiB of headroom and give the engine 40 GiB (~32 GiB KV, ~1M tokens at 32 KiB/token/GPU).
#
#   (Transcripts below: without learner offload, the engine at 0.5 of the GPU. The preset
#   offloads the learner while the engine generates, train.offload=copy, and gives the engine
#   0.85: rollout phase 71.81 GiB on the first layout; see the preset's header.)
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_32b.yaml --world-size 32 train.offload=none rollout.mem_fraction_static=0.5
#   model: 32.76B parameters (qwen2, 64 layers, hidden 5120, 40 heads / 8 KV groups, ffn 27648, vocab 152064) from the model.* fields of examples/configs/rlsd_32b.yaml
#   layout: tp=8 pp=2 cp=1 dp=2 sp distopt recompute=full
#   component                           GiB/GPU
#   weights                                3.81
#   gradients (fp32)                       7.63
#   optimizer (fp32 main + Adam)          11.44
#   activations (in flight)                2.27
#   logits + ops workspace                 1.75
#   teacher copy                           3.81
#   rollout engine (awake)                40.00
#   training phase peak                   30.72
#   rollout phase peak                    66.70
#   budget                                74.00
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_32b.yaml --world-size 16 train.offload=none rollout.mem_fraction_static=0.5
#   layout: tp=8 pp=2 cp=1 dp=1 sp distopt recompute=full
#   optimizer (fp32 main + Adam)          22.89
#   training phase peak                   42.16
#   rollout phase peak                    78.15
#   DOES NOT FIT
#
#SBATCH --job-name=rlsd-32b
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
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_32b.yaml
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
