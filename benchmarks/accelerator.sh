#!/usr/bin/env bash
# Every accelerator measurement in one go, for a short GPU lease: the train step
# beside the PyTorch peers (float32 and bfloat16 params), the sampler and its parts,
# the coupled-GRPO time split (all at the qwen2.5-coder-1.5b shape), then the
# GPU-only tests. Each part has its own time limit, so one that fails or hangs
# leaves the rest their turn.
#
#   bash benchmarks/accelerator.sh [OUT_DIR [PART ...]]
#       OUT_DIR: default $OUT, else runs/accelerator
#       PART: train_step decode sampler_parts decode_profile grpo_split gpu_tests
#             (default: all)
#
# Writes OUT_DIR/PART.json and OUT_DIR/PART.log. Where dllm's needs are missing
# (grain, ml-collections, ...), wheels in .whl/ are installed first (see the
# device tool's README for how they are made).
set -u
out=${1:-${OUT:-runs/accelerator}}
shift $(( $# > 0 ? 1 : 0 ))
parts=${*:-train_step decode sampler_parts decode_profile grpo_split gpu_tests}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
run_part() {  # run_part NAME SECONDS COMMAND...: run, log, report exit status and time
  local name=$1 limit=$2; shift 2
  [[ " $parts " == *" $name "* ]] || return 0
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 14 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
run_part train_step 170 python3 benchmarks/train_step.py --param_dtype float32,bfloat16 \
  --peer mask,nomask --json "$out/train_step.json"
run_part decode 160 python3 benchmarks/decode.py --modes one_per_step,threshold_cache \
  --json "$out/decode.json"
run_part sampler_parts 60 python3 benchmarks/sampler_parts.py --json "$out/sampler_parts.json"
# A jax.profiler trace of one one-per-step generate at batch 8 (the decode case above),
# its busiest ops printed to the log; the trace is tarred ($OUT returns files at most two
# folders down): open it in TensorBoard's profile plugin or Perfetto.
run_part decode_profile 240 bash -c "python3 benchmarks/decode.py --batch 8 \
  --modes one_per_step --reps 1 --profile /tmp/decode_profile \
  && tar czf '$out/decode_profile.tar.gz' -C /tmp decode_profile"
run_part grpo_split 150 python3 benchmarks/grpo_estimators.py --split_only \
  --json "$out/grpo_split.json"
run_part gpu_tests 50 env JAX_PLATFORMS=cuda XLA_FLAGS= python3 -m pytest -q \
  -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_model.py
