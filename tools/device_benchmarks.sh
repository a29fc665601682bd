#!/usr/bin/env bash
# The accelerator rows of docs/benchmarks.md, in one call:
#   TEXT_ENCODER=DIR OUT=DIR bash tools/device_benchmarks.sh [quick] [RUN ...]
# TEXT_ENCODER: a BERT folder (config.json + tokenizer files; weights are not
# read: the encoders are randomly initialised, which changes values, not cost).
# RUN: names from the table below (default: ALL). Every benchmark is its own
# process (peak memory is per process); they compile side by side, then time
# their steps one at a time (tools/benchmark.py --queue), so the device and
# the host are idle while each is timed. Writes OUT/bench.tgz (<run>.json and
# .err, the profiler traces of the *_prof runs under traces/, gpu_tests.log:
# tests/test_gpu.py), repacked after every run so that a call cut short still
# returns what finished, and prints a table last. 'quick' shrinks everything (a
# CPU dry run of this script).
set -u
OUT=${OUT:-/tmp/device_benchmarks}
mkdir -p "$OUT"
TEXT=${TEXT_ENCODER:?set TEXT_ENCODER to a BERT folder}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # Several processes share the device while compiling.

COMMON=(--config=experiments/synthetic.py --json --config.pretrain.text_encoder="$TEXT")
# The paper's encoders: ViT-B/16 at 224 and a 6-layer BERT of width 768.
PAPER=(--config.pretrain.vit=B/16 --config.pretrain.vit_depth=0 --config.pretrain.image_size=224
       --config.pretrain.text_weights_init=random --config.pretrain.text_hidden=768 --config.pretrain.text_heads=12)
PRE_BATCH=32; SSL_BATCH=16; UNET=64; SIZE=224; STEPS=(--steps=20 --warmup=3); LIMIT=${LIMIT:-420}
QUICK=${1:-}
if [ "$QUICK" = quick ]; then
  shift
  PAPER=(--config.pretrain.vit=Ti/16 --config.pretrain.vit_depth=1 --config.pretrain.image_size=32
         --config.pretrain.text_weights_init=random --config.pretrain.text_hidden=32 --config.pretrain.text_heads=2
         --config.pretrain.text_layers=1 --config.pretrain.head_hidden=64)
  PRE_BATCH=4; SSL_BATCH=2; UNET=4; SIZE=32; STEPS=(--steps=2 --warmup=1); LIMIT=240
fi
PRE=(--mode=pretrain "${PAPER[@]}")
SSL=(--mode=ssl "${PAPER[@]}" --config.data.image_size=$SIZE --config.unet.base_width=$UNET --config.train.batch_size=$SSL_BATCH)
BF16=(--config.dtype=bfloat16)

# name | extra XLA_FLAGS | benchmark arguments. 'xla'/'scatter' = the kernels a CPU uses;
# 'fast' = cuDNN's fused ViT attention + one-hot-matmul text embedding gradients.
PLAIN=(--config.pretrain.vit_attention=xla --config.pretrain.text_embedding_grad=scatter)
FAST=(--config.pretrain.vit_attention=cudnn --config.pretrain.text_embedding_grad=one_hot)
declare -A XLA ARGS
ARGS[pretrain_bf16]="${PRE[*]} ${BF16[*]} ${PLAIN[*]} --config.pretrain.batch_size=$PRE_BATCH"
ARGS[pretrain_bf16_prof]="${ARGS[pretrain_bf16]}"
ARGS[pretrain_bf16_onehot]="${PRE[*]} ${BF16[*]} ${PLAIN[*]} --config.pretrain.text_embedding_grad=one_hot --config.pretrain.batch_size=$PRE_BATCH"
ARGS[pretrain_bf16_cudnn]="${PRE[*]} ${BF16[*]} ${PLAIN[*]} --config.pretrain.vit_attention=cudnn --config.pretrain.batch_size=$PRE_BATCH"
ARGS[pretrain_bf16_fast]="${PRE[*]} ${BF16[*]} ${FAST[*]} --config.pretrain.batch_size=$PRE_BATCH"
ARGS[pretrain_bf16_fast_prof]="${ARGS[pretrain_bf16_fast]}"
ARGS[pretrain_bf16_b64]="${PRE[*]} ${BF16[*]} ${PLAIN[*]} --config.pretrain.batch_size=$((2 * PRE_BATCH))"
ARGS[pretrain_bf16_b128]="${PRE[*]} ${BF16[*]} ${PLAIN[*]} --config.pretrain.batch_size=$((4 * PRE_BATCH))"
ARGS[pretrain_bf16_fast_b64]="${PRE[*]} ${BF16[*]} ${FAST[*]} --config.pretrain.batch_size=$((2 * PRE_BATCH))"
ARGS[pretrain_bf16_cublas]="${ARGS[pretrain_bf16]}"
XLA[pretrain_bf16_cublas]="--xla_gpu_enable_triton_gemm=false"
ARGS[pretrain_fp32]="${PRE[*]} --config.dtype=float32 ${PLAIN[*]} --config.pretrain.batch_size=$PRE_BATCH"
ARGS[ssl_bf16]="${SSL[*]} ${BF16[*]} ${PLAIN[*]}"
ARGS[ssl_bf16_fast]="${SSL[*]} ${BF16[*]} ${FAST[*]}"
# docs/benchmarks.md: the second call ran ALL; the first call ran pretrain_bf16_prof, pretrain_bf16_b64,
# pretrain_bf16_b128, pretrain_bf16_cublas, pretrain_fp32 and ssl_bf16 (with the code before the one-hot option).
ALL=(pretrain_bf16 pretrain_bf16_onehot pretrain_bf16_cudnn pretrain_bf16_fast_prof ssl_bf16_fast)
RUNS=("$@"); [ ${#RUNS[@]} -eq 0 ] && RUNS=("${ALL[@]}")

WORK=$(mktemp -d)  # Everything is written here and packed into OUT/bench.tgz after every run,
QUEUE=$WORK/queue  # so a call cut short still returns what finished (and OUT holds one file).
mkdir -p "$WORK/traces" "$QUEUE"
pack() { tar czf "$OUT/.bench.$BASHPID.tgz" -C "$WORK" --exclude=queue . && mv "$OUT/.bench.$BASHPID.tgz" "$OUT/bench.tgz"; }
run() {
  local name=$1 started=$SECONDS profile=()
  [[ $name == *_prof ]] && profile=(--profile="/tmp/trace_$name")
  # Each run is a background subshell: its XLA_FLAGS stay its own.
  # shellcheck disable=SC2086
  local xla; xla=$(echo ${XLA_FLAGS:-} ${XLA[$name]:-})
  if [ -n "$xla" ]; then export XLA_FLAGS="$xla"; else unset XLA_FLAGS; fi
  timeout "$LIMIT" python3 tools/benchmark.py "${COMMON[@]}" "${STEPS[@]}" \
    ${ARGS[$name]} "${profile[@]}" --queue="$QUEUE:$name:${#RUNS[@]}" >"$WORK/$name.json" 2>"$WORK/$name.err"
  local status=$?
  touch "$QUEUE/$name.compiled"  # Also when it died before compiling: the others must not wait for it.
  echo "$name: exit $status after $((SECONDS - started)) s"
  [ -s "$WORK/$name.json" ] || tail -n 5 "$WORK/$name.err"
  if [ ${#profile[@]} -gt 0 ]; then
    find "/tmp/trace_$name" -name 'perfetto_trace.json.gz' -exec cp {} "$WORK/traces/$name.json.gz" \; 2>/dev/null
  fi
  pack
}
if [ "$QUICK" != quick ] && python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"; then
  # Small and done while the benchmarks compile (their timing waits for every compile).
  (JAX_PLATFORMS=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py >"$WORK/gpu_tests.log" 2>&1
   echo "GPU tests: exit $?"; tail -n 3 "$WORK/gpu_tests.log") &
fi
for name in "${RUNS[@]}"; do run "$name" & done
wait
pack

python3 - "$WORK" <<'PY'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(path.read_text())
    except ValueError:
        continue
    rows.append(f"| {path.stem} | {r['dtype']} | {r['images_per_step']} | {r['seconds_per_step']*1e3:.1f} | "
                f"{r['step_latency_seconds']*1e3:.1f} | {r['images_per_second']:.0f} | {r['compile_seconds']:.0f} | "
                f"{r.get('model_flops_per_step', 0)/1e12:.3f} | {r['matmul_peak_flops_per_device']/1e12:.0f} | "
                f"{r.get('achieved_flops', 0)/1e12:.0f} | {100*r.get('mfu', 0):.1f} | {r['peak_memory_bytes']/2**30:.1f} | "
                f"{r.get('first_step_loss')} |")
    print(f"{path.stem}: model FLOPs from {r.get('model_flops_source')}")
    for thread, p in (r.get("profile") or {}).items():
        print(f"## {path.stem} [{thread}] busy {p['busy_ms_per_step']:.2f} ms of {p['span_ms_per_step']:.2f} ms, "
              f"{p['events_per_step']:.0f} events per step")
        for op in p["ops"][:8]:
            print(f"   {op['ms_per_step']:8.3f} ms x{op['calls_per_step']:<5.0f} {op['name'][:100]}")
print("| run | dtype | images/step | ms/step | latency ms | images/s | compile s | TFLOP/step | matmul peak TFLOP/s | "
      "achieved TFLOP/s | MFU % | peak GiB | first loss |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
print("\n".join(rows))
PY
