#!/bin/bash
# RLSD on a Llama-3-70B-style model (examples/configs/rlsd_70b.yaml): 8 nodes x 8 H100 80GB.
#
#   bash slurm/rlsd_70b.sh --dry-run        # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Llama-3.1-70B-Instruct RLSD_INIT_CKPT=/ckpt/llama70b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_70b.sh [section.key=value ...]      # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh.
#
# Layout: TP=8 inside each node (every layer all-reduces over NVLink), PP=4 across nodes (one
# activation send per micro-batch and stage over InfiniBand), DP=2; sequence parallelism,
# distributed optimizer (fp32 main weights + Adam sharded over DP), full activation
# recomputation, FP8 (TE, tensorwise scaling) GEMMs; SGLang engines with engine_tp=8, one
# node's GPUs (17.6 GB of weights per GPU), asleep while the learner trains. CP stays 1: with
# recomputation a 20480-token micro-batch keeps 4 GiB of activations; CP is for much longer
# sequences (parallel.cp=2 halves them). Pipeline bubble ~ (PP-1) / micro-batches: 1024
# sequences per DP rank and step make >= 50 packed micro-batches, <= 6%, so no VPP.
#
# Why 8 nodes: the planner (80 GB, 6 GB reserve) on 4 nodes gives DP=1, so the distributed
# optimizer cannot shard (25.4 GiB of optimizer state per GPU) and the rollout phase needs
# 78.3 GiB > 74; it fits there only with the engine cut to rollout.mem_fraction_static=0.3,
# i.e. 24 - 16.4 (weights) = 7.6 GiB of KV cache per GPU, ~190k tokens per engine: a handful of
# 20480-token sequences at a time, against 2048 rollouts per step. 8 nodes halve the optimizer
# state and leave the engine 36 GiB (~19.6 GiB KV, ~500k tokens per engine at 40 KiB/token/GPU).
# Without recomputation the training phase needs 97.5 GiB.
#
#   (Transcripts below: without learner offload, the engine at 0.45 of the GPU. The preset
#   offloads the learner while the engine generates, train.offload=copy, and gives the engine
#   0.85: rollout phase 72.23 GiB on the first layout; see the preset's header.)
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_70b.yaml --world-size 64 train.offload=none rollout.mem_fraction_static=0.45
#   model: 70.55B parameters (llama, 80 layers, hidden 8192, 64 heads / 8 KV groups, ffn 28672, vocab 128256) from the model.* fields of examples/configs/rlsd_70b.yaml
#   layout: tp=8 pp=4 cp=1 dp=2 sp distopt recompute=full
#   component                           GiB/GPU
#   weights                                4.23
#   gradients (fp32)                       8.46
#   optimizer (fp32 main + Adam)          12.69
#   activations (in flight)                3.96
#   logits + ops workspace                 1.48
#   teacher copy                           4.23
#   rollout engine (awake)                36.00
#   training phase peak                   35.05
#   rollout phase peak                    65.61
#   budget                                74.00
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_70b.yaml --world-size 32 train.offload=none rollout.mem_fraction_static=0.45
#   layout: tp=8 pp=4 cp=1 dp=1 sp distopt recompute=full
#   optimizer (fp32 main + Adam)          25.38
#   training phase peak                   47.74
#   rollout phase peak                    78.31
#   DOES NOT FIT
# The planner does not count TE's FP8 weight copies (~1-2 bytes per local parameter, 2-4 GiB
# here): the 8.4 GiB of rollout headroom covers them.
#
#SBATCH --job-name=rlsd-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@1800
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --signal: 30 min before the limit, enough for one step plus a 70B checkpoint save (SLURM may
# send it up to 60 s early or late). Add --partition / --account as your cluster requires.
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: the repository is then the
# submission directory (submit from its root) unless RLSD_HOME names it.
RLSD_HOME=${RLSD_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $RLSD_HOME/slurm/common.sh ]] || RLSD_HOME=${SLURM_SUBMIT_DIR:-$PWD}
[[ -f $RLSD_HOME/slurm/common.sh ]] || { echo "rlsd: no slurm/common.sh under $RLSD_HOME: submit from the repository root or set RLSD_HOME" >&2; exit 1; }
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_70b.yaml
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
