#!/usr/bin/env bash
# The accelerator rows of docs/benchmarks.md, in one call:
#   TEXT_ENCODER=DIR OUT=DIR bash tools/device_benchmarks.sh [quick]
# TEXT_ENCODER: a BERT folder (config.json + tokenizer files; weights are not
# read: the encoders are randomly initialised, which changes values, not cost).
# Each benchmark runs in its own process (peak memory is per process) and
# writes OUT/<name>.json; a failing one is reported and the rest still run.
# 'quick' shrinks everything to seconds (a CPU dry run of this script).
set -u
OUT=${OUT:-/tmp/device_benchmarks}
mkdir -p "$OUT"
TEXT=${TEXT_ENCODER:?set TEXT_ENCODER to a BERT folder}
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

COMMON=(--config=experiments/synthetic.py --json --config.pretrain.text_encoder="$TEXT")
# The paper's encoders: ViT-B/16 at 224 and a 6-layer BERT of width 768.
PAPER=(--config.pretrain.vit=B/16 --config.pretrain.vit_depth=0 --config.pretrain.image_size=224
       --config.pretrain.text_weights_init=random --config.pretrain.text_hidden=768 --config.pretrain.text_heads=12)
PRE_BATCH=32; SSL_BATCH=16; UNET=64; SIZE=224; STEPS=(--steps=20 --warmup=3); LIMIT=240
if [ "${1:-}" = quick ]; then
  PAPER=(--config.pretrain.vit=Ti/16 --config.pretrain.vit_depth=1 --config.pretrain.image_size=32
         --config.pretrain.text_weights_init=random --config.pretrain.text_hidden=32 --config.pretrain.text_heads=2
         --config.pretrain.text_layers=1 --config.pretrain.head_hidden=64)
  PRE_BATCH=4; SSL_BATCH=2; UNET=4; SIZE=32; STEPS=(--steps=2 --warmup=1); LIMIT=120
fi

run() {
  local name=$1; shift
  local started=$SECONDS
  timeout $LIMIT python3 tools/benchmark.py "${COMMON[@]}" "${STEPS[@]}" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
  echo "$name: exit $? after $((SECONDS - started)) s"
  [ -s "$OUT/$name.json" ] || tail -n 5 "$OUT/$name.err"
}

PRE=(--mode=pretrain "${PAPER[@]}" --config.pretrain.batch_size=$PRE_BATCH)
SSL=(--mode=ssl "${PAPER[@]}" --config.data.image_size=$SIZE --config.unet.base_width=$UNET --config.train.batch_size=$SSL_BATCH)
run pretrain_bf16 "${PRE[@]}" --config.dtype=bfloat16
run ssl_bf16 "${SSL[@]}" --config.dtype=bfloat16
run pretrain_fp32 "${PRE[@]}" --config.dtype=float32
run ssl_fp32 "${SSL[@]}" --config.dtype=float32
run pretrain_bf16_remat "${PRE[@]}" --config.dtype=bfloat16 --config.pretrain.remat=True

python3 - "$OUT" <<'PY'
import json, pathlib, sys
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(path.read_text())
    except ValueError:
        continue
    rows.append(f"| {path.stem} | {r['device_kind']} | {r['dtype']} | {r['seconds_per_step']*1e3:.1f} | {r['steps_per_second']:.2f} | "
                f"{r['images_per_second']:.0f} | {r['compile_seconds']:.0f} | {r.get('model_flops_per_step', 0)/1e12:.3f} | "
                f"{r['matmul_peak_flops_per_device']/1e12:.0f} | {100*r.get('mfu', 0):.1f} | {r['peak_memory_bytes']/2**30:.1f} | {r.get('first_step_loss')} |")
print("| run | device | dtype | ms/step | steps/s | images/s | compile s | TFLOP/step | matmul peak TFLOP/s | MFU % | peak GiB | first loss |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
print("\n".join(rows))
PY
