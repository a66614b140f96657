#!/bin/bash
# RLSD at 8B (examples/configs/rlsd_8b.yaml) with rollouts on their own node and one-step-off-policy
# training: 2 learner nodes + 1 engine node, 3 x 8 H100 80GB.
#
#   bash slurm/rlsd_8b_offpolicy.sh --dry-run        # anywhere: layout, memory plan, the srun command
#   RLSD_MODEL=/ckpt/Qwen3-8B RLSD_INIT_CKPT=/ckpt/qwen3-8b-mcore RLSD_DATA=/data/math \
#     sbatch slurm/rlsd_8b_offpolicy.sh [section.key=value ...]   # from the repository root
# Environment, logs, signals and requeueing: slurm/common.sh ("Learner nodes + engine nodes").
#
# Layout (RLSD_ENGINE_NODES=1, the last node; srun places ranks node by node):
#   node 1   ranks  0-7    learner: TP=4 groups, replicas 0-1
#   node 2   ranks  8-15   learner: replicas 2-3            (DP=4 over the 16 learner GPUs)
#   node 3   ranks 16-23   one SGLang engine per GPU (engine_tp=1: 16.4 GB of bf16 weights, the
#                          rest of 0.85 of the GPU is KV cache); engine ranks 16+d and 20+d serve
#                          replica d, half of its prompts each
# Each replica's host (its TP rank 0) splits its prompts over its two engine ranks and gets the
# rollouts back in prompt order (each engine samples with the seeds of its prompts' places in the
# batch); global rank 0 broadcasts every weight update to the 8 engines (NCCL). With
# train.off_policy_steps=1 the engines generate step n+1's rollouts with step n-1's weights while
# the learners train step n, and the ratio is taken against the engines' log-probs (one update
# stale). TP=4 without recomputation is the colocated preset's layout; train.offload=none: nothing
# shares the learners' GPUs. A checkpoint (every 10 steps, and on the time-limit warning) holds the
# batch generated for the next step, so a requeued job resumes exactly; the engines get the weights
# by the sync that starts every attempt. The plan is the learners' (the engines have their GPUs to
# themselves):
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_8b.yaml --world-size 24 rollout.placement=separate \
#         rollout.engine_ranks=8 train.offload=none rollout.engine_tp=1 train.off_policy_steps=1
#   layout: tp=4 pp=1 cp=1 dp=4 sp distopt recompute=none
#   weights                                3.81
#   gradients (fp32)                       7.63
#   optimizer (fp32 main + Adam)           5.72
#   activations (in flight)               27.42
#   logits + ops workspace                 3.48
#   teacher copy                           3.81
#   rollout engine (awake)                 0.00
#   training phase peak                   51.88
#   rollout phase peak                    20.98
#   rollout engines: on 8 GPU(s) of their own (rollout.placement=separate)
#   fits
#
#SBATCH --job-name=rlsd-8b-offpolicy
#SBATCH --nodes=3
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# --signal: 15 min before the limit, enough for one step, the rest of the batch in flight and a
# checkpoint save (SLURM may send it up to 60 s early or late). Add --partition / --account as
# your cluster requires.
set -euo pipefail

# sbatch runs a copy of this file from its spool directory: the repository is then the
# submission directory (submit from its root) unless RLSD_HOME names it.
RLSD_HOME=${RLSD_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
[[ -f $RLSD_HOME/slurm/common.sh ]] || RLSD_HOME=${SLURM_SUBMIT_DIR:-$PWD}
[[ -f $RLSD_HOME/slurm/common.sh ]] || { echo "rlsd: no slurm/common.sh under $RLSD_HOME: submit from the repository root or set RLSD_HOME" >&2; exit 1; }
RLSD_DEFAULT_CONFIG=examples/configs/rlsd_8b.yaml
RLSD_DEFAULT_ENGINE_NODES=1
RLSD_DEFAULT_RUN=rlsd_8b_offpolicy # not rlsd_8b's run: its checkpoints hold the next step's batch
# The preset's changes for this layout (before RLSD_EXTRA_ARGS and the script's arguments): one line.
RLSD_LAYOUT_ARGS="train.offload=none rollout.engine_tp=1 train.off_policy_steps=1"
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
