#!/usr/bin/env bash
# The GPU figures of the README in one run: the cuDNN attention checks, then BERT-base (seq 128) and
# BERT-large (seq 512) MLM steps, the GPT-2-shaped causal-LM step and generation, each jaxlm in bf16
# against transformers (SDPA attention, bf16 autocast) on the same GPU.
#
#   tools/bench_gpu.sh record DIR   # here, with TensorFlow: the steps' batches and tokenizers into DIR
#   tools/bench_gpu.sh run DIR OUT  # on the GPU machine: the checks and benchmarks, JSON summaries into OUT
#   EXTRA="--layers 1" tools/bench_gpu.sh run ...   # more flags for every benchmark (last wins)
#
# The train steps are the ones `python -m jaxlm.train` builds (trainer.setup), fed the batches its
# input pipeline made here (bench.py --record / --batches): a GPU image often has no TensorFlow.
# Attention dropout is 0 on both sides, so both take their fused attention kernels.
set -u
cmd=${1:?record DIR or run DIR OUT}
dir=${2:?DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=$here${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

BASE=(--preset base --seq 128 --batch 256 --max_predictions 20)
LARGE=(--preset large --seq 512 --batch 64 --max_predictions 76)
CAUSAL=(--mode causal-train --layers 4 --seq 1024 --batch 16)
STEPS=(--warmup 2 --steps 5 --repeats 2)

if [ "$cmd" = record ]; then
  set -e
  $PY "$here/tools/bench.py" "${BASE[@]}" "${STEPS[@]}" --record "$dir/bert_base"
  $PY "$here/tools/bench.py" "${LARGE[@]}" "${STEPS[@]}" --record "$dir/bert_large"
  $PY "$here/tools/bench.py" "${CAUSAL[@]}" "${STEPS[@]}" --record "$dir/causal"
  exit 0
fi

out=${3:?OUT}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import jax, flax, torch, transformers; print("jax", jax.__version__, jax.devices(), "flax", flax.__version__,
"torch", torch.__version__, "transformers", transformers.__version__)'
# The fused kernels' numerics against the explicit / XLA attention, on the GPU.
timeout 120 $PY -m pytest -q -p no:cacheprovider -o addopts='' "$here/tests/test_attention.py" \
  "$here/tests/test_decoder.py" -k cudnn 2>&1 | tail -3
jax_only=(--dtype bfloat16 --torch_device cuda --attention_dropout 0)
gpu=("${jax_only[@]}" --compare torch)
bench() {  # name, timeout in s, flags
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  local log=/tmp/bench_gpu_$name.log
  timeout "$limit" $PY "$here/tools/bench.py" "$@" ${EXTRA:-} --json "$out/$name.json" > $log 2>&1
  local rc=$?
  grep -E '^(jaxlm|torch|ratio)' $log || tail -15 $log
  [ $rc = 0 ] || echo "$name: exit $rc"
}
bench bert_base 150 "${BASE[@]}" "${STEPS[@]}" "${gpu[@]}" --batches "$dir/bert_base"
bench bert_large 200 "${LARGE[@]}" "${STEPS[@]}" "${gpu[@]}" --batches "$dir/bert_large"
bench causal_train 120 "${CAUSAL[@]}" "${STEPS[@]}" "${gpu[@]}" --batches "$dir/causal"
bench generate 120 --mode generate --layers 4 --seq 128 --dtype bfloat16 --torch_device cuda --repeats 3
# Where BERT-large's element-wise time goes (38% of a step, the exact GELU 11%), jaxlm alone against bert_large
# above: the tanh GELU, which cuBLASLt can fuse into a matmul's epilogue, with XLA's cuBLASLt rewrites on.
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_cublaslt=true" bench bert_large_tanh_gelu_lt 200 "${LARGE[@]}" "${STEPS[@]}" \
  "${jax_only[@]}" --set model.hidden_act=gelu_tanh --batches "$dir/bert_large"
