# shellcheck shell=bash
# The launch logic shared by slurm/rlsd_*.sh (sourced by them, not run on its own).
#
# One job attempt, top to bottom (`rlsd_main`):
#   1. resolve the layout (nodes x GPUs per node = one process per GPU; with RLSD_ENGINE_NODES the
#      last nodes' processes host the rollout engines, see "Learner nodes + engine nodes" below),
#      the paths and the config overrides that point the run at them;
#   2. export the rendezvous (MASTER_ADDR = first host of the allocation) and the NCCL settings;
#   3. check that the input paths exist and run the memory planner on this node: a typo, an
#      invalid config or a layout that does not fit stops here, in seconds, with the reason,
#      instead of after every rank has loaded its shard;
#   4. `srun` one process per GPU, ranks in node order (--distribution=block); `rlsd_megatron.
#      parallel.state.init_distributed` maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to RANK /
#      WORLD_SIZE / LOCAL_RANK;
#   5. the attempt ends in one of these ways, each written to $RLSD_LOGS/<run>/attempts.log:
#      - SIGUSR1 reaches this shell: the time-limit warning (`#SBATCH --signal=B:USR1@T`), or a
#        pre-emption when the site sets PreemptParameters=send_user_signal (the warning then comes
#        at pre-emption time, GraceTime before the kill). The shell forwards it to srun, srun to
#        every process of the step; the trainer checkpoints at its next safe point and exits 0
#        (its engine and verifier processes keep running: they start with the signal blocked,
#        rlsd_megatron/parallel/signals.py); the job requeues itself and the next attempt resumes
#        from that checkpoint (`checkpoint.resume=auto`);
#      - SIGUSR2 (`scancel --batch --signal=USR2 <job>`): the same checkpoint and stop, no requeue:
#        the graceful way to stop a run;
#      - SIGTERM (a plain `scancel`, a pre-emption without send_user_signal, the end of the grace
#        time): srun answers SIGTERM by killing the step (SIGKILL), so no checkpoint can be made;
#        the run resumes from its last periodic one (`checkpoint.save_interval`); SLURM requeues
#        a pre-empted --requeue job by itself;
#      - the trainer stops by itself before the job's end: it measures its steps and checkpoint
#        saves and does not start a step that would not finish, with its save, before the end time
#        (RLSD_JOB_END_TIME, from SLURM); it checkpoints, exits 0 and writes "time" to
#        attempt-N/stop_reason (RLSD_STOP_FILE); the job requeues itself;
#      - the training processes fail (a crash, out of memory, an NCCL timeout, a sick GPU): the
#        job requeues itself up to RLSD_MAX_FAILURES times, excluding the node whose task failed
#        first (srun's first "error: <node>: task N: ..." line), and resumes.
# `--dry-run` does 1-3 and prints the srun command instead of running it, on any machine.
#
# Learner nodes + engine nodes (RLSD_ENGINE_NODES=E > 0, rollout.placement=separate): of the job's
# N nodes x G GPUs, ranks 0 .. (N-E)*G-1 on nodes 1 .. N-E train (Megatron's TP/PP/CP/DP groups span
# them only) and ranks (N-E)*G .. N*G-1 on the last E nodes each host one rollout engine on their GPU
# (rollout.engine_ranks = E*G, the world's last ranks: rlsd_megatron/parallel/state.py). srun's block
# distribution puts ranks on nodes in order, so no engine shares a node with a learner. Each
# data-parallel replica sends its prompts to its engine rank(s) (with more engines than replicas it
# splits them over several; with fewer, replicas share one) and global rank 0 broadcasts the weights
# to all of them (rlsd_megatron/rollout/separate.py). The stop signals reach the engine ranks too: they keep serving until
# the trainer, having saved its checkpoint (with one-step-off-policy the next step's batch in it),
# stops them. The planner plans the learner ranks only.
#
# What the site must allow: jobs submitted with --requeue (the scripts' #SBATCH lines), users may
# requeue their own jobs (`scontrol requeue`) and set their ExcNodeList; for a checkpoint on
# pre-emption PreemptParameters=send_user_signal and a GraceTime longer than one training step
# plus a checkpoint save (the trainer logs both as perf/step_seconds and perf/save_seconds).
# Chains of jobs of one run: submit with --dependency=singleton and the same --job-name, so at
# most one runs at a time; they share RLSD_RUN_NAME, hence the checkpoints.
#
# Environment (optional unless marked):
#   RLSD_MODEL         HF model directory: config.json, tokenizer, the weights SGLang loads.
#                      -> model.hf_config, data.tokenizer_dir. Required with the default config.
#   RLSD_INIT_CKPT     Megatron checkpoint of the same model (tools/convert_hf_to_megatron.py, any
#                      TP/PP) -> checkpoint.init_from. Required with the default config.
#   RLSD_DATA          directory holding train.parquet and val.parquet. Required with the default
#                      config (or give RLSD_TRAIN_FILES / RLSD_VAL_FILES: comma-separated paths).
#   RLSD_CKPT_DIR      checkpoint root (default $RLSD_HOME/checkpoints); this run: $RLSD_CKPT_DIR/$RLSD_RUN_NAME
#   RLSD_LOGS          log root (default $RLSD_HOME/logs); this run: $RLSD_LOGS/$RLSD_RUN_NAME/
#                      tensorboard/, attempts.log and attempt-N/rank-R.log, srun.log
#                      (N = SLURM_RESTART_COUNT, or the next free number when a new job resumes the run)
#   RLSD_RUN_NAME      the run's identity: its checkpoints and logs. Default <config>-<model dir>
#                      (e.g. rlsd_8b-Qwen3-8B), not the job id, so that a resubmitted job resumes the
#                      run; give different runs of one config and model their own names
#   RLSD_CONFIG        YAML config (default: the script's); when set, the three inputs above are
#                      optional (the config may use a built-in task or set them itself)
#   RLSD_EXTRA_ARGS    more dotted overrides, space-separated; script arguments come after them
#   RLSD_PYTHON        interpreter (default $RLSD_HOME/.venv/bin/python if present, else python3)
#   RLSD_GPUS_PER_NODE default $SLURM_GPUS_ON_NODE, else 8
#   RLSD_ENGINE_NODES  the last nodes that host rollout engines, one per GPU (default: the script's, else
#                      0: engines colocated with the learner): rollout.placement=separate and
#                      rollout.engine_ranks=RLSD_ENGINE_NODES x GPUs per node; see above
#   RLSD_NODES         node count for --dry-run outside a job (default: the script's #SBATCH --nodes)
#   RLSD_MAX_REQUEUES  attempts after the first before the job stops requeueing itself (default 20)
#   RLSD_MAX_FAILURES  failed attempts (non-zero exit without a warning) requeued before the run
#                      gives up (default 2; 0: a failure ends the job)
#   RLSD_EXCLUDE_FAILED_NODES  1 (default): a requeue after a failure excludes the node whose task
#                      failed first (scontrol update ExcNodeList); 0 on a partition with no spare nodes
#   RLSD_CONTAINER_IMAGE   run the training and the planner in this pyxis/enroot image (srun
#                      --container-image); RLSD_CONTAINER_MOUNTS (default $RLSD_HOME:$RLSD_HOME, add the
#                      model, data and checkpoint directories: src:dst[,src:dst...]) and
#                      RLSD_CONTAINER_WORKDIR (default $RLSD_HOME) go to --container-mounts / -workdir
#   RLSD_NCCL_DEBUG_FILE   1: NCCL_DEBUG=INFO into attempt-N/nccl-<host>-<pid>.log per process
#   MASTER_ADDR, MASTER_PORT  default: first host of $SLURM_JOB_NODELIST, 12000 + (job id + attempt)
#                      mod 8000 (below Linux's ephemeral ports and SGLang's 22000-30000+ ports)
# Set by a model script before it sources this file: RLSD_DEFAULT_CONFIG (its preset),
# RLSD_DEFAULT_ENGINE_NODES (RLSD_ENGINE_NODES's default), RLSD_LAYOUT_ARGS (its changes to the preset:
# dotted overrides on one line, before RLSD_EXTRA_ARGS), RLSD_DEFAULT_RUN (the run name's first part,
# default the config's name).
# Relative paths are relative to the repository root ($RLSD_HOME), where the job runs. Those set
# are checked before the planner (also by --dry-run): RLSD_MODEL must hold config.json,
# RLSD_INIT_CKPT and RLSD_DATA must be directories, every data file must exist.

rlsd_die() {
    echo "rlsd: error: $*" >&2
    exit 1
}

rlsd_log() {
    echo "rlsd: $*"
}

# The interpreter: RLSD_PYTHON, else the repository's .venv, else python3.
rlsd_python() {
    if [[ -n ${RLSD_PYTHON:-} ]]; then
        echo "$RLSD_PYTHON"
    elif [[ -x $RLSD_HOME/.venv/bin/python ]]; then
        echo "$RLSD_HOME/.venv/bin/python"
    else
        echo python3
    fi
}

# The #SBATCH --nodes of the model script: the node count its layout was planned for.
rlsd_header_nodes() {
    sed -n 's/^#SBATCH --nodes=\([0-9][0-9]*\).*/\1/p' "$1" | head -n 1
}

# Fills the globals used below: layout, paths, overrides.
rlsd_resolve() {
    local script=$1 header_nodes hosts

    cd "$RLSD_HOME" || rlsd_die "cannot cd to RLSD_HOME=$RLSD_HOME"
    in_job=0
    [[ -n ${SLURM_JOB_ID:-} ]] && in_job=1

    header_nodes=$(rlsd_header_nodes "$script")
    if ((in_job)); then
        nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_JOB_NUM_NODES is not set inside a job}}
    else
        nodes=${RLSD_NODES:-$header_nodes}
    fi
    [[ $nodes =~ ^[1-9][0-9]*$ ]] || rlsd_die "node count '$nodes' is not a positive integer (set RLSD_NODES or #SBATCH --nodes)"
    gpus_per_node=${RLSD_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    [[ $gpus_per_node =~ ^[1-9][0-9]*$ ]] || rlsd_die "GPUs per node '$gpus_per_node' is not a positive integer (set RLSD_GPUS_PER_NODE)"
    world_size=$((nodes * gpus_per_node))
    engine_nodes=${RLSD_ENGINE_NODES:-${RLSD_DEFAULT_ENGINE_NODES:-0}}
    [[ $engine_nodes =~ ^[0-9]+$ ]] && ((engine_nodes < nodes)) ||
        rlsd_die "RLSD_ENGINE_NODES=$engine_nodes: give 0 (colocated engines) up to $((nodes - 1)) of the $nodes nodes, leaving nodes to train"
    engine_ranks=$((engine_nodes * gpus_per_node))
    # CPUs for each rank's data loading, tokenisation and reward workers; SLURM >= 22.05 no
    # longer passes the batch script's --cpus-per-task on to srun, so it is given explicitly.
    cpus_per_task=$((${SLURM_CPUS_ON_NODE:-$(nproc)} / gpus_per_node))
    ((cpus_per_task >= 1)) || cpus_per_task=1

    if ((in_job)); then
        hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set inside a job}") ||
            rlsd_die "scontrol show hostnames '$SLURM_JOB_NODELIST' failed"
        export MASTER_ADDR=${MASTER_ADDR:-${hosts%%$'\n'*}}
        # Per job (two jobs sharing a node do not collide) and per attempt (the previous
        # attempt's store socket may still be in TIME_WAIT); below the ephemeral range (32768+),
        # which outgoing connections draw from, and SGLang's ports (rollout/sglang_engine.py).
        export MASTER_PORT=${MASTER_PORT:-$((12000 + (SLURM_JOB_ID + ${SLURM_RESTART_COUNT:-0}) % 8000))}
    fi

    config=${RLSD_CONFIG:-$RLSD_DEFAULT_CONFIG}
    [[ -f $config ]] || rlsd_die "config '$config' does not exist (relative paths start at $RLSD_HOME)"
    run_name=${RLSD_RUN_NAME:-${RLSD_DEFAULT_RUN:-$(basename "$config" .yaml)}${RLSD_MODEL:+-$(basename "$RLSD_MODEL")}}
    [[ $run_name =~ ^[A-Za-z0-9._+-]+$ ]] || rlsd_die "run name '$run_name' may hold letters, digits and . _ + - only (set RLSD_RUN_NAME)"
    ckpt_dir=${RLSD_CKPT_DIR:-$RLSD_HOME/checkpoints}/$run_name
    log_dir=${RLSD_LOGS:-$RLSD_HOME/logs}/$run_name
    # A resubmitted job restarts SLURM_RESTART_COUNT at 0: continue the run's attempt numbers.
    attempt=${SLURM_RESTART_COUNT:-0}
    while [[ -e $log_dir/attempt-$attempt ]]; do
        attempt=$((attempt + 1))
    done
    attempt_dir=$log_dir/attempt-$attempt
    python=$(rlsd_python)

    local train_files=${RLSD_TRAIN_FILES:-} val_files=${RLSD_VAL_FILES:-} extra=() layout=()
    if [[ -n ${RLSD_DATA:-} ]]; then
        train_files=${train_files:-$RLSD_DATA/train.parquet}
        val_files=${val_files:-$RLSD_DATA/val.parquet}
    fi
    rlsd_check_inputs
    if [[ -z ${RLSD_CONFIG:-} ]] && ((!dry_run)); then
        # The example configs carry no weights or data of their own: without these the job
        # would train a randomly initialised model on nothing, after a day in the queue.
        [[ -n ${RLSD_MODEL:-} ]] || rlsd_die "set RLSD_MODEL to the HF model directory (config.json, tokenizer, weights)"
        [[ -n ${RLSD_INIT_CKPT:-} ]] || rlsd_die "set RLSD_INIT_CKPT to a Megatron checkpoint of it (tools/convert_hf_to_megatron.py)"
        [[ -n $train_files ]] || rlsd_die "set RLSD_DATA (a directory with train.parquet, val.parquet) or RLSD_TRAIN_FILES"
    fi

    overrides=("checkpoint.dir=$ckpt_dir" "checkpoint.resume=auto" "logging.dir=$log_dir/tensorboard")
    if [[ -n ${RLSD_MODEL:-} ]]; then
        overrides+=("model.hf_config=$RLSD_MODEL" "data.tokenizer_dir=$RLSD_MODEL")
    fi
    if [[ -n ${RLSD_INIT_CKPT:-} ]]; then
        overrides+=("checkpoint.init_from=$RLSD_INIT_CKPT")
    fi
    if [[ -n $train_files ]]; then
        overrides+=("data.train_files=[$train_files]") # a YAML list
    fi
    if [[ -n $val_files ]]; then
        overrides+=("data.val_files=[$val_files]")
    fi
    if ((engine_ranks)); then
        overrides+=("rollout.placement=separate" "rollout.engine_ranks=$engine_ranks")
    fi
    # The model script's own changes to its preset (RLSD_LAYOUT_ARGS), then the user's.
    read -r -a layout <<<"${RLSD_LAYOUT_ARGS:-}"
    read -r -a extra <<<"${RLSD_EXTRA_ARGS:-}"
    overrides+=("${layout[@]}" "${extra[@]}" "${script_args[@]}")
}

# Every input path that is set must exist here (in --dry-run too, and in the job before srun):
# a typo stops the launch in a second, naming the variable, instead of on every rank after start-up.
rlsd_check_inputs() {
    local fix
    if [[ -n ${RLSD_MODEL:-} ]]; then
        fix="set RLSD_MODEL to the HF model directory (config.json, tokenizer, weights)"
        [[ -d $RLSD_MODEL ]] || rlsd_die "RLSD_MODEL=$RLSD_MODEL is not a directory; $fix"
        [[ -f $RLSD_MODEL/config.json ]] || rlsd_die "RLSD_MODEL=$RLSD_MODEL has no config.json; $fix"
    fi
    if [[ -n ${RLSD_INIT_CKPT:-} ]]; then
        [[ -d $RLSD_INIT_CKPT ]] || rlsd_die "RLSD_INIT_CKPT=$RLSD_INIT_CKPT is not a directory; set it to the" \
            "Megatron checkpoint of the model (the --out of tools/convert_hf_to_megatron.py)"
    fi
    if [[ -n ${RLSD_DATA:-} ]]; then
        [[ -d $RLSD_DATA ]] || rlsd_die "RLSD_DATA=$RLSD_DATA is not a directory; set it to the directory holding" \
            "train.parquet and val.parquet"
        fix="put train.parquet and val.parquet there, or unset RLSD_DATA and set RLSD_TRAIN_FILES (and RLSD_VAL_FILES)"
        [[ -n ${RLSD_TRAIN_FILES:-} || -f $RLSD_DATA/train.parquet ]] || rlsd_die "RLSD_DATA=$RLSD_DATA has no train.parquet; $fix"
        [[ -n ${RLSD_VAL_FILES:-} || -f $RLSD_DATA/val.parquet ]] || rlsd_die "RLSD_DATA=$RLSD_DATA has no val.parquet; $fix"
    fi
    rlsd_check_files RLSD_TRAIN_FILES "${RLSD_TRAIN_FILES:-}"
    rlsd_check_files RLSD_VAL_FILES "${RLSD_VAL_FILES:-}"
}

# $1: the variable that named the files (for the message), $2: its comma-separated paths.
rlsd_check_files() {
    local path paths=()
    IFS=, read -r -a paths <<<"$2"
    for path in "${paths[@]}"; do
        [[ -f $path ]] || rlsd_die "$1: data file '$path' does not exist (relative paths start at $RLSD_HOME);" \
            "give comma-separated .parquet / .jsonl / .json files"
    done
}

# NCCL / InfiniBand and process settings. Defaults only: a value already in the environment
# wins. Fabric-specific names belong in the submitting shell (sbatch exports it): for example
# NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME (the TCP interface for NCCL's bootstrap and the gloo
# groups, e.g. ib0 or ^lo,docker), NCCL_IB_HCA (the compute HCAs, e.g. mlx5_0,mlx5_1,...; leave
# out storage NICs), NCCL_IB_GID_INDEX (RoCE: usually 3 for RoCEv2).
rlsd_export_env() {
    # A failed or timed-out collective aborts its process, so srun --kill-on-bad-exit ends the
    # step at once instead of the other ranks waiting in the next collective until the time limit.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Free a collective's buffers when it completes instead of pinning them with record_stream:
    # lower peak memory, which the colocated engine needs.
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    # Megatron's TP / sequence-parallel communication overlap needs kernels issued in order on
    # one hardware queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    # Problems only; NCCL_DEBUG=INFO (with NCCL_DEBUG_SUBSYS=INIT,NET) prints which transport
    # (NVLink, IB/GDRDMA, sockets) each ring uses: the first thing to read when a job is slow or hangs.
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # IB retransmission timeout 4.096 us * 2^22 = 17 s (NCCL's default 2^20 = 4 s): rides out a
    # link flap or a switch restart on a large fabric instead of failing the collective.
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
    # NVLink SHARP reserves extra GPU memory for every communicator, and Megatron creates one per
    # TP, PP, DP, CP and model-parallel group; the colocated engine's KV cache needs it more.
    export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
    # Per-rank logs appear as they are written, not when a 4 KiB buffer fills.
    export PYTHONUNBUFFERED=1
    # torchrun's default is 1 thread per process; here, a rank's share of the node's CPUs (on GPU
    # nodes each rank sets its own from the cores it binds to; verifier workers get 1, SGLang's
    # processes a rank's share: rlsd_megatron/parallel/cpu_binding.py).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus_per_task}
    # Compute nodes rarely reach the Hub; everything loads from RLSD_MODEL.
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    # NCCL's flight recorder: a collective that times out dumps every rank's last collectives
    # (which rank is behind, in which call) to attempt-N/nccl-trace-<rank>, instead of a bare timeout.
    export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
    export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
    export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$attempt_dir/nccl-trace-}
    if [[ ${RLSD_NCCL_DEBUG_FILE:-0} == 1 ]]; then
        export NCCL_DEBUG=INFO NCCL_DEBUG_FILE=$attempt_dir/nccl-%h-%p.log
    fi
}

# "3" or "1-2": the numbers $1 to $2.
rlsd_span() {
    if (($1 == $2)); then echo "$1"; else echo "$1-$2"; fi
}

rlsd_print_layout() {
    echo "== rlsd launch: $script_name$( ((dry_run)) && echo ' (dry run)') =="
    echo "config:       $config"
    echo "processes:    $nodes node(s) x $gpus_per_node GPU(s) = $world_size ranks, one per GPU (srun), $cpus_per_task CPU(s) each"
    if ((engine_ranks)); then
        echo "learners:     ranks 0-$((world_size - engine_ranks - 1)) on node(s) $(rlsd_span 1 $((nodes - engine_nodes)))"
        echo "engines:      ranks $((world_size - engine_ranks))-$((world_size - 1)) on node(s) $(rlsd_span $((nodes - engine_nodes + 1)) "$nodes"), one rollout engine per GPU (rollout.placement=separate)"
    fi
    if ((in_job)); then
        echo "job:          ${SLURM_JOB_ID} attempt $attempt (max requeues ${RLSD_MAX_REQUEUES:-20}) on ${SLURM_JOB_NODELIST}"
        echo "rendezvous:   MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT (env://, ranks from SLURM_PROCID)"
    else
        echo "rendezvous:   MASTER_ADDR=<first host of \$SLURM_JOB_NODELIST> MASTER_PORT=<12000 + (job id + attempt) mod 8000>"
    fi
    echo "run:          $run_name (RLSD_RUN_NAME; a resubmission with the same name resumes it)"
    echo "checkpoints:  $ckpt_dir (resume=auto)"
    echo "logs:         $log_dir/tensorboard, $attempt_dir/rank-<R>.log, $log_dir/attempts.log"
    if [[ -n ${RLSD_CONTAINER_IMAGE:-} ]]; then
        echo "container:    ${container_args[*]}"
    fi
}

# pyxis/enroot options of every srun (training and planner): the image the job runs in.
rlsd_container_args() {
    container_args=()
    if [[ -n ${RLSD_CONTAINER_IMAGE:-} ]]; then
        container_args=(--container-image="$RLSD_CONTAINER_IMAGE"
            --container-mounts="${RLSD_CONTAINER_MOUNTS:-$RLSD_HOME:$RLSD_HOME}"
            --container-workdir="${RLSD_CONTAINER_WORKDIR:-$RLSD_HOME}")
    fi
}

# The memory planner on this node, with the launch's own config and overrides; it also runs the
# trainer's config and layout checks for this world size. Its exit status says which refusal it was.
# In a job with a container image it runs in that image (one task on this node), so the checks
# use the Python and packages the training will; outside a job (--dry-run) on this machine's Python.
rlsd_plan() {
    local plan=("$python" -m rlsd_megatron.plan --config "$config" --world-size "$world_size" "${overrides[@]}") status=0
    if ((in_job)) && [[ -n ${RLSD_CONTAINER_IMAGE:-} ]]; then
        plan=(srun --nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 "${container_args[@]}" "${plan[@]}")
    fi
    echo "== memory plan: ${plan[*]} =="
    "${plan[@]}" || status=$?
    case $status in
        0) ;;
        1) rlsd_die "the layout does not fit in GPU memory on $world_size GPUs (rlsd-plan's table above); nothing was launched" ;;
        2) rlsd_die "the config, its overrides or the layout for $world_size GPUs are invalid (rlsd-plan's error above); nothing was launched" ;;
        *) rlsd_die "the planner failed (exit status $status, output above); nothing was launched" ;;
    esac
}

rlsd_srun_command() {
    srun_cmd=(srun --nodes="$nodes" --ntasks-per-node="$gpus_per_node" --cpus-per-task="$cpus_per_task"
        --distribution=block --gpu-bind=none --cpu-bind=none --kill-on-bad-exit=1 --output="$attempt_dir/rank-%t.log" "${container_args[@]}"
        "$python" -m rlsd_megatron.train --config "$config" "${overrides[@]}")
    # --distribution=block: ranks fill node 1, then node 2, ...: the learner / engine split by rank
    # is one by node (RLSD_ENGINE_NODES).
    # --gpu-bind=none: every rank sees all GPUs of its node (it picks cuda:LOCAL_RANK itself), so
    # an SGLang engine hosted by one rank can span engine_tp GPUs of the node.
    # --cpu-bind=none: SLURM cannot know which GPU a rank drives; each rank binds itself to cores of
    # its GPU's socket and starts SGLang's and the verifiers' processes on the node's CPUs
    # (parallel.bind_cpus, rlsd_megatron/parallel/cpu_binding.py).
    # --kill-on-bad-exit=1: one rank failing ends the step rather than leaving the rest hung.
}

# SIGUSR1 (the time-limit or pre-emption warning) and SIGUSR2 (a graceful stop): ask the
# trainer to checkpoint and stop (srun forwards SIGUSR1 to every process of the step), then
# requeue after SIGUSR1 only.
rlsd_on_stop_signal() {
    stop_reason=$1
    if [[ $stop_reason == warning ]]; then
        rlsd_log "SIGUSR1 (time limit or pre-emption warning): the trainer checkpoints at its next safe point; the job then requeues"
        requeue=1
    else
        rlsd_log "SIGUSR2 (graceful stop): the trainer checkpoints at its next safe point; no requeue"
        requeue=0
    fi
    interrupted=1
    if [[ -n ${srun_pid:-} ]]; then
        kill -USR1 "$srun_pid" 2>/dev/null || true
    fi
}

# SIGTERM (scancel, pre-emption, the end of the grace time) reaches srun too, which kills the
# step with SIGKILL: nothing to forward. SLURM requeues a pre-empted --requeue job by itself.
rlsd_on_terminate() {
    rlsd_log "SIGTERM: srun ends the training processes (SIGKILL); the run resumes from its last checkpoint"
    stop_reason=terminated
    requeue=0
    interrupted=1
}

# The job's end time in seconds since the epoch, for the trainer (RLSD_JOB_END_TIME); empty when
# SLURM does not say (no time limit, or no squeue on the node).
rlsd_job_end_time() {
    local end
    if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then
        echo "$SLURM_JOB_END_TIME"
        return 0
    fi
    end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null) || return 0
    date -d "$end" +%s 2>/dev/null || true
}

# One line per attempt in $log_dir/attempts.log: when, which attempt of which job, how it ended.
rlsd_record_attempt() {
    printf '%s\tjob %s\tattempt %s\t%s\n' "$(date -u +%FT%TZ)" "${SLURM_JOB_ID:-}" "$attempt" "$*" >>"$log_dir/attempts.log"
}

# The node whose task failed first, from srun's first "srun: error: <node>: task(s) N: ..." line:
# under --kill-on-bad-exit srun reports the failing task before the ones it then kills, whose
# lines ("Killed") look like those of a task the kernel's OOM killer ended.
rlsd_failed_node() {
    sed -n 's/^srun: error: \([^:]*\): tasks\{0,1\} [0-9,-]*: .*$/\1/p' "$attempt_dir/srun.log" 2>/dev/null | head -n 1
}

# Runs srun in the background, so that this shell takes the signals, and waits for its status.
# srun's own messages (which node's task failed, how) also go to attempt-N/srun.log.
rlsd_run_step() {
    local again
    # tee ignores the stop signals (a job's SIGTERM reaches every process of the batch step):
    # srun must not lose its stderr while it reports how the step ended.
    "${srun_cmd[@]}" 2> >(trap '' TERM USR1 USR2; exec tee -a "$attempt_dir/srun.log" >&2) &
    srun_pid=$!
    step_status=0
    wait "$srun_pid" || step_status=$?
    # A trapped signal cuts `wait` short (status 128 + signal) while srun runs on: wait again.
    # 127 means the cut-short wait had in fact collected srun's status already.
    while ((interrupted)); do
        interrupted=0
        again=0
        wait "$srun_pid" || again=$?
        ((again == 127)) || step_status=$again
    done
    srun_pid=
}

rlsd_requeue() {
    local max=${RLSD_MAX_REQUEUES:-20}
    if ((${SLURM_RESTART_COUNT:-0} >= max)); then
        rlsd_log "not requeueing: requeue ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID reached RLSD_MAX_REQUEUES=$max"
        return 1
    fi
    rlsd_log "requeueing job $SLURM_JOB_ID (next attempt $((attempt + 1)) resumes from $ckpt_dir)"
    scontrol requeue "$SLURM_JOB_ID" || rlsd_die "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
}

# After a failed attempt: requeue (bounded by RLSD_MAX_FAILURES over the run), without the node
# that failed. Returns 1 when the run gives up.
rlsd_requeue_after_failure() {
    local failed_node failures max=${RLSD_MAX_FAILURES:-2} excluded
    failed_node=$(rlsd_failed_node)
    rlsd_record_attempt "failed: exit status $step_status${failed_node:+ on $failed_node}"
    failures=$(grep -c $'\tfailed: ' "$log_dir/attempts.log")
    if ((failures > max)); then
        rlsd_log "not requeueing: $failures failed attempts, more than RLSD_MAX_FAILURES=$max (see $log_dir/attempts.log)"
        return 1
    fi
    if [[ -n $failed_node && ${RLSD_EXCLUDE_FAILED_NODES:-1} == 1 ]]; then
        excluded=$(cat "$log_dir/excluded_nodes" 2>/dev/null || true)
        excluded=$(printf '%s\n' "$excluded" "$failed_node" | tr , '\n' | sed '/^$/d' | sort -u | paste -sd, -)
        echo "$excluded" >"$log_dir/excluded_nodes"
        rlsd_log "excluding node(s) $excluded from the next attempt"
        scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$excluded" ||
            rlsd_log "warning: could not set ExcNodeList=$excluded; the next attempt may land on the same node(s)"
    fi
    rlsd_log "failed attempt $failures of at most $((max + 1)) (RLSD_MAX_FAILURES=$max)"
    rlsd_requeue
}

rlsd_main() {
    local script=$0 arg
    dry_run=0
    script_args=()
    script_name=$(basename "$script")
    for arg in "$@"; do
        case $arg in
            --dry-run) dry_run=1 ;;
            -h | --help)
                sed -n '2,/^set -/p' "$script" | sed -n 's/^# \{0,1\}//p'
                return 0
                ;;
            -*) rlsd_die "unknown option $arg (expected --dry-run, --help or section.key=value overrides)" ;;
            *) script_args+=("$arg") ;;
        esac
    done

    requeue=0
    interrupted=0
    stop_reason=
    srun_pid=
    trap 'rlsd_on_stop_signal warning' USR1
    trap 'rlsd_on_stop_signal stop' USR2
    trap rlsd_on_terminate TERM

    rlsd_resolve "$script"
    rlsd_container_args
    rlsd_export_env
    rlsd_print_layout
    rlsd_plan
    rlsd_srun_command
    echo "== command =="
    printf '%q ' "${srun_cmd[@]}"
    echo
    if ((dry_run)); then
        return 0
    fi
    ((in_job)) || rlsd_die "not inside a SLURM job: submit with sbatch $script (or add --dry-run)"
    mkdir -p "$ckpt_dir" "$attempt_dir"
    if ((interrupted)); then # a signal before the launch: nothing to save
        rlsd_record_attempt "stopped before the launch ($stop_reason)"
        if ((requeue)); then
            rlsd_requeue || true
        fi
        return 0
    fi
    RLSD_JOB_END_TIME=$(rlsd_job_end_time)
    export RLSD_JOB_END_TIME RLSD_STOP_FILE=$attempt_dir/stop_reason
    rlsd_log "training; progress in $attempt_dir/rank-$((world_size - 1)).log (the last rank logs)"
    rlsd_run_step
    if [[ -n $stop_reason ]]; then
        # 0: checkpointed and stopped; 128+SIGUSR1: the signal came before the trainer installed
        # its handler (still loading), so there is nothing new to save either.
        if [[ $stop_reason != terminated ]] && ((step_status == 0 || step_status == 128 + 10)); then
            rlsd_record_attempt "stopped by SIGUSR$([[ $stop_reason == warning ]] && echo 1 || echo 2) (exit status $step_status)"
            if ((requeue)); then
                rlsd_requeue || true
            fi
            return 0
        fi
        rlsd_record_attempt "$stop_reason: exit status $step_status"
        [[ $stop_reason == terminated ]] && exit 143
        rlsd_die "the training processes exited with status $step_status after the $stop_reason signal; not requeueing (see $attempt_dir)"
    fi
    if ((step_status == 0)) && [[ $(cat "$RLSD_STOP_FILE" 2>/dev/null || true) == time ]]; then
        # trainer/stopping.py: a step would not have finished before the job's end
        rlsd_record_attempt "stopped before the job's end"
        rlsd_log "the trainer checkpointed and stopped before the job's end"
        rlsd_requeue || true
        return 0
    fi
    if ((step_status != 0)); then
        rlsd_log "the training processes exited with status $step_status (see $attempt_dir)"
        rlsd_requeue_after_failure && return 0
        rlsd_die "the training processes exited with status $step_status; giving up (see $log_dir/attempts.log)"
    fi
    rlsd_record_attempt "finished"
    rlsd_log "training finished"
}
