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
#   node 1   ranks  0-7    learner: TP=2 pairs, replicas 0-3
#   node 2   ranks  8-15   learner: replicas 4-7            (DP=8 over the 16 learner GPUs)
#   node 3   ranks 16-23   one SGLang engine per GPU (engine_tp=1: 16.4 GB of bf16 weights, the
#                          rest of 0.85 of the GPU is KV cache); engine rank 16+d serves replica d
# Each replica's host (its TP rank 0) sends its prompts to its own engine rank and gets the
# rollouts back; global rank 0 broadcasts every weight update to the 8 engines (NCCL). With
# train.off_policy_steps=1 the engines generate step n+1's rollouts with step n-1's weights while
# the learners train step n, and the ratio is taken against the engines' log-probs (one update
# stale). Why TP=2 with full recomputation: one engine per replica means DP=8; at TP=4 (the
# colocated preset's, no recomputation) DP=8 needs 4 learner nodes, and 2 nodes at TP=4 give 4
# replicas, which the trainer refuses with 8 engines (below). train.offload=none: nothing shares the
# learners' GPUs. A checkpoint (every 10 steps, and on the time-limit warning) holds the batch
# generated for the next step, so a requeued job resumes exactly; the engines get the weights by the
# sync that starts every attempt. The plan is the learners' (the engines have their GPUs to themselves):
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_8b.yaml --world-size 24 rollout.placement=separate \
#         rollout.engine_ranks=8 parallel.tp=2 precision.recompute_granularity=full precision.recompute_method=uniform \
#         precision.recompute_num_layers=1 train.offload=none rollout.engine_tp=1 train.off_policy_steps=1
#   layout: tp=2 pp=1 cp=1 dp=8 sp distopt recompute=full
#   weights                                7.63
#   gradients (fp32)                      15.26
#   optimizer (fp32 main + Adam)           5.72
#   activations (in flight)                4.34
#   logits + ops workspace                 6.96
#   teacher copy                           7.63
#   rollout engine (awake)                 0.00
#   training phase peak                   47.54
#   rollout phase peak                    36.24
#   rollout engines: on 8 GPU(s) of their own (rollout.placement=separate)
#   fits
#   $ python -m rlsd_megatron.plan --config examples/configs/rlsd_8b.yaml --world-size 24 rollout.placement=separate \
#         rollout.engine_ranks=8 train.offload=none rollout.engine_tp=1 train.off_policy_steps=1
#     - rollout.engine_ranks=8 with 4 data-parallel replica(s): each replica sends its whole batch to one engine rank (rollout/separate.py), so 4 engine(s) would get no requests; set rollout.engine_ranks <= 4 or train with more replicas
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
RLSD_LAYOUT_ARGS="parallel.tp=2 precision.recompute_granularity=full precision.recompute_method=uniform precision.recompute_num_layers=1 train.offload=none rollout.engine_tp=1 train.off_policy_steps=1"
# shellcheck source=slurm/common.sh
source "$RLSD_HOME/slurm/common.sh"
rlsd_main "$@"
