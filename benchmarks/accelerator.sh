#!/usr/bin/env bash
# Every accelerator measurement in one go, for a short GPU lease: the train step
# beside the PyTorch peers, bfloat16 params, the sampler, the coupled-GRPO time
# split (all at the qwen2.5-coder-1.5b shape), then the GPU-only tests. Each part
# has its own time limit, so one that fails or hangs leaves the rest their turn.
#
#   bash benchmarks/accelerator.sh [OUT_DIR]      (default $OUT, else runs/accelerator)
#
# Writes OUT_DIR/{train_step,train_step_bf16,decode,grpo_split}.json and a log per
# part. Where dllm's needs are missing (grain, ml-collections, ...), wheels in .whl/
# are installed first (see /work/.library/device/README.md for how they are made).
set -u
out=${1:-${OUT:-runs/accelerator}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
part() {  # part NAME SECONDS COMMAND...: run, log, report its exit status and time
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 12 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
part train_step 190 python3 benchmarks/train_step.py --peer mask,nomask --json "$out/train_step.json"
part decode 160 python3 benchmarks/decode.py --modes one_per_step,threshold_cache \
  --json "$out/decode.json"
part grpo_split 120 python3 benchmarks/grpo_estimators.py --split_only --json "$out/grpo_split.json"
part train_step_bf16 80 python3 benchmarks/train_step.py --param_dtype bfloat16 --peer "" \
  --json "$out/train_step_bf16.json"
part gpu_tests 60 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py \
  tests/test_model.py
