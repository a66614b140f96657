#!/bin/bash
# RLSD on a Qwen3-8B-style model (examples/configs/rlsd_8b.yaml): 1 node x 8 H100 80GB.
#
#   bash slurm/rlsd_8b.sh --dry-run         # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen3-8B RLSD_INIT_CKPT=/ckpt/qwen3-8b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_8b.sh [section.key=value ...]       # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh.
#
# Layout: TP=4 (NVLink), DP=2 on one node; sequence parallelism, distributed optimizer, bf16,
# no activation recomputation (27.4 GiB of activations per 20480-token micro-batch fit); one
# SGLang engine with engine_tp=4 on each model-parallel group's 4 GPUs, asleep while the
# learner trains. TP=4 is the smallest TP that fits without recomputation (which would cost
# ~1/3 more compute): at TP=2 the training phase needs 103.8 GiB. TP=8 also fits (59.1 GiB)
# but halves the GEMMs again for no memory it needs. One node is the allocation unit, so the
# 8B job uses one; more nodes add data parallelism (`sbatch --nodes=2 slurm/rlsd_8b.sh`).
#
#   (Transcripts below: without learner offload, the engine at 0.5 of the GPU. The preset
#   offloads the learner while the engine generates, train.offload=copy, and gives the engine
#   0.85: rollout phase 71.81 GiB on the first layout; see the preset's header.)
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_8b.yaml --world-size 8 train.offload=none rollout.mem_fraction_static=0.5
#   model: 8.19B parameters (qwen3, 36 layers, hidden 4096, 32 heads / 8 KV groups, ffn 12288, vocab 151936) from the model.* fields of examples/configs/rlsd_8b.yaml
#   layout: tp=4 pp=1 cp=1 dp=2 sp distopt recompute=none
#   component                           GiB/GPU
#   weights                                3.81
#   gradients (fp32)                       7.63
#   optimizer (fp32 main + Adam)          11.44
#   activations (in flight)               27.42
#   logits + ops workspace                 3.48
#   teacher copy                           3.81
#   rollout engine (awake)                40.00
#   training phase peak                   57.60
#   rollout phase peak                    66.70
#   budget                                74.00
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_8b.yaml --world-size 8 train.offload=none rollout.mem_fraction_static=0.5 parallel.tp=2 \
#         rollout.engine_tp=2
#   layout: tp=2 pp=1 cp=1 dp=4 sp distopt recompute=none
#   activations (in flight)               54.84
#   training phase peak                  103.77
#   rollout phase peak                    81.96
#   DOES NOT FIT
#
#SBATCH --job-name=rlsd-8b
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
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_8b.yaml
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
