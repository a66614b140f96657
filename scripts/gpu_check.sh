#!/usr/bin/env bash
# One short pass of the GPU checks on a lent GPU machine (one H100/H200), every step under its
# own time limit, logs in $OUT (or ./runs/gpu_check). It runs what the machine's Python can:
#   1. the GPU learner tests (without Transformer Engine only the local-spec ones pass; the TE
#      ones fail at TransformerConfig, which the log shows);
#   2. an RLSD run of the CPU demo on the GPU (local spec, embedded engine), 1 process, with a
#      checkpoint and a resume from it;
#   3. every method on the GPU for a few steps (local spec, embedded engine, 1 process): OPSD and
#      SDPO (chunked teacher logits on the device), textbook GRPO with KL to the initial policy,
#      OPD with a teacher model warm-started here, RLSD stopped by SIGUSR1 and resumed;
#      and RLSD with the fused output layer;
#   4. benchmarks/learner_step.py, vocab_parallel_ops.py, weight_sync.py and fused_output.py on CUDA.
# A machine without megatron-core etc. gets them from wheels in .whl/ (see the issue note on how
# they were fetched): pip install --target /tmp/site, no network needed.
#   bash scripts/gpu_check.sh              # everything, ~8 min
#   bash scripts/gpu_check.sh tests train  # some steps only (tests, train, methods, bench)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
steps=${*:-"tests train methods bench"}

if ! "$python" -c "import megatron.core, math_verify" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__, 'cuda', torch.cuda.is_available())"

step() {  # step NAME SECONDS COMMAND...: runs it under a limit, output to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=KILL "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - start)) s"
    tail -n 15 "$out/$name.log"
}

case " $steps " in *" tests "*)
    step tests 120 "$python" -m pytest -q -x -p no:cacheprovider tests/learner/test_gpu_learner.py ;;
esac
case " $steps " in *" train "*)
    run_dir=$(mktemp -d)
    demo=(--config examples/configs/cpu_demo.yaml precision.transformer_impl=local rollout.backend=embedded
          warm_start.max_steps=300 checkpoint.dir="$run_dir/ckpt" checkpoint.save_interval=10
          logging.dir="$run_dir/logs" logging.progress_bar=false)
    step train 120 "$python" -m torch.distributed.run --nproc-per-node 1 -m rlsd_megatron.train "${demo[@]}" train.steps=10
    step resume 90 "$python" -m torch.distributed.run --nproc-per-node 1 -m rlsd_megatron.train "${demo[@]}" \
        train.steps=20 checkpoint.resume=auto
    ls "$run_dir/ckpt" ;;
esac
case " $steps " in *" methods "*)
    run_dir=$(mktemp -d)
    tiny=(--config examples/configs/cpu_demo.yaml precision.transformer_impl=local rollout.backend=embedded
          warm_start.max_steps=0 train.steps=3 train.eval_interval=0 logging.progress_bar=false)
    method() {  # method NAME SECONDS OVERRIDES...
        local name=$1 limit=$2
        shift 2
        step "$name" "$limit" "$python" -m torch.distributed.run --nproc-per-node 1 -m rlsd_megatron.train \
            "${tiny[@]}" logging.dir="$run_dir/$name" "$@"
    }
    method opsd 60 algorithm.method=opsd algorithm.teacher_weights=frozen algorithm.distill_loss=jsd
    method sdpo 60 algorithm.method=sdpo algorithm.teacher_weights=ema algorithm.distill_loss=topk \
        algorithm.distill_support=student algorithm.distill_topk=8
    method grpo_kl 60 algorithm.method=grpo algorithm.kl_coef=0.04 algorithm.clip_high=0.2 algorithm.dual_clip=null
    method opd_teacher 60 model.hidden_size=192 model.num_layers=4 model.ffn_hidden_size=512 warm_start.max_steps=20 \
        warm_start.output="$run_dir/teacher" train.steps=0
    method fused 60 train.fused_output_layer=true train.fused_output_chunk_tokens=64
    method opd 60 algorithm.method=opd algorithm.teacher_weights=separate algorithm.teacher_model="$run_dir/teacher"
    # A stop signal from outside mid-run: checkpoint, exit 0; then resume to the end.
    (   # to the training process, not torchrun's launcher (whose cmdline names the module too)
        sleep 25
        for pid in $(pgrep -f "rlsd_megatron.train.*rlsd_stop"); do
            grep -q torch.distributed.run "/proc/$pid/cmdline" || kill -USR1 "$pid"
        done
    ) &
    method rlsd_stop 90 train.steps=1000 checkpoint.dir="$run_dir/ckpt" checkpoint.save_interval=0
    saved=$(cat "$run_dir/ckpt/latest_checkpointed_iteration.txt" 2>/dev/null || echo 0)
    method rlsd_resume 60 checkpoint.dir="$run_dir/ckpt" checkpoint.resume=auto train.steps=$((saved + 2)) ;;
esac
case " $steps " in *" bench "*)
    step learner_step 100 "$python" benchmarks/learner_step.py --device cuda --hidden 1024 --layers 8 --batch 8 \
        --seq-len 1024 --vocab 32000 --steps 10 --warmup 3
    step vocab_ops 60 "$python" benchmarks/vocab_parallel_ops.py --device cuda --tp 1 --tokens 4096
    step weight_sync 80 "$python" benchmarks/weight_sync.py --device cuda
    step fused_output 60 "$python" benchmarks/fused_output.py --device cuda --tokens 8192 --hidden 4096 --chunk 1024 ;;
esac
