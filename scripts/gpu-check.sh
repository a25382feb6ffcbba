#!/usr/bin/env bash
# The GPU checks in one call.
#
#   scripts/gpu-check.sh pack [DIR]   here (no GPU needed): builds `vlp` with the `cuda`
#                                     feature (needs nvcc, CUDA_HOME, CUDA_COMPUTE_CAP), strips
#                                     and compresses it into DIR (default gpu-carry/, ignored
#                                     by git, well under 64 MiB) with the model config and
#                                     recipe the checks train
#   scripts/gpu-check.sh run [DIR]    on a machine with an NVIDIA GPU and driver, from the
#                                     repository root: every check, then one table
#
# The checks: the same tiny pretraining run (synthetic shapes, a seeded init, seeded draws)
# on the CPU and on CUDA, whose step losses must agree to f32 noise; retrieval evaluation,
# embeddings and pair scores on CUDA; the full training step timed on both devices.
set -euo pipefail
mode=${1:?usage: gpu-check.sh pack|run [DIR]}
DIR=${2:-gpu-carry}

pack() {
  : "${CUDA_COMPUTE_CAP:=90}"
  export CUDA_COMPUTE_CAP
  cargo build --release --features cuda
  rm -rf "$DIR"; mkdir -p "$DIR"
  strip -o "$DIR/vlp" target/release/vlp
  xz -T0 -6 -f "$DIR/vlp"
  # The checks' model: the `tiny` preset at 32 px with patch 8, a 200-token vocabulary and a
  # queue of 96, as the CPU end-to-end tests train it.
  cat > "$DIR/recipe.toml" <<'EOF'
[model]
preset = "tiny"

[data]
shards = "train-{000000..000003}.tar"
tokenizer = "tok.json"
batch_size = 16
workers = 2
transform = "light"
shuffle_buffer = 32
max_tokens = 16
image_size = 64

[optim]
lr = 1e-3
min_lr = 1e-4
warmup_lr = 1e-4
warmup_steps = 2
weight_decay = 0.02
clip_grad_norm = 5.0
total_steps = 4

[run]
out_dir = "run"
seed = 7
log_every = 1
save_every = 0

[eval]
sets = [{ name = "val", shards = "val-000000.tar" }]
k_test = 8
EOF
  du -sh "$DIR"
}

run() {
  local here bin work
  here=$(cd "$DIR" && pwd)
  bin=$(mktemp -d)
  xz -dc "$here/vlp.xz" > "$bin/vlp"; chmod +x "$bin/vlp"
  local libs=""
  for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libs="$libs:$d"
  done
  for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    for d in "$sp"/nvidia/*/lib "$sp"/nvidia/cu13/lib; do [ -d "$d" ] && libs="$libs:$d"; done
  done
  export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local V="$bin/vlp"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  work=$(mktemp -d); cd "$work"
  cp "$here/recipe.toml" .
  "$V" shards synth --out train --count 256 --per-shard 64 --image-size 64 --seed 1 >/dev/null
  "$V" shards synth --out val --count 64 --per-shard 64 --image-size 64 --seed 2 >/dev/null
  "$V" tokenizer train 'train-{000000..000003}.tar' --out tok.json --vocab-size 200 >/dev/null
  local status=0
  for dev in cpu cuda; do
    echo "== pretrain on $dev"
    "$V" pretrain --recipe recipe.toml --no-progress --device "$dev" \
      --set "run.out_dir=\"$dev\"" > "$dev.eval.md" 2> "$dev.log" || { status=1; tail -20 "$dev.log"; }
    tail -3 "$dev.log"
  done
  echo "== eval, embed, score on cuda"
  ck=cuda/checkpoints/step-000004
  "$V" eval retrieval --checkpoint "$ck" --shards val-000000.tar --tokenizer tok.json \
    --device cuda --k-test 8 --no-progress --out eval.json > /dev/null 2> eval.log || { status=1; tail -5 eval.log; }
  printf 'a red circle\na blue square\n' > texts.txt
  "$V" embed --checkpoint "$ck" --texts texts.txt --tokenizer tok.json --out e.safetensors \
    --device cuda 2> embed.log || { status=1; tail -5 embed.log; }
  echo "== full step, tiny preset, batch 32, 32 tokens"
  for dev in cpu cuda; do
    "$V" bench step --full --preset tiny --batch-size 32 --text-len 32 --warmup 3 --steps 10 \
      --device "$dev" > "step-$dev.json" 2> "step-$dev.log" || { status=1; tail -5 "step-$dev.log"; }
  done
  python3 - <<'EOF' || status=1
import json, os
def losses(d):
    rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
    return [{k: v for k, v in r.items() if k.startswith("loss_")} for r in rows if "loss_total" in r]
rows = []
ok = True
try:
    a, b = losses("cpu"), losses("cuda")
    worst = max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in x)
    agree = len(a) == len(b) == 4 and worst < 2e-3
    ok &= agree
    rows.append(("pretrain cpu vs cuda, 4 steps: max |loss diff|", f"{worst:.2e}", "ok" if agree else "FAIL"))
except Exception as e:
    ok = False; rows.append(("pretrain cpu vs cuda", repr(e), "FAIL"))
try:
    r = json.load(open("eval.json"))
    rows.append(("eval retrieval on cuda: r_mean", f"{r['reranked']['r_mean']:.2f}" if 'reranked' in r else str(r)[:60], "ok"))
except Exception as e:
    ok = False; rows.append(("eval retrieval on cuda", repr(e), "FAIL"))
rows.append(("embed on cuda", "e.safetensors" if os.path.exists("e.safetensors") else "missing", "ok" if os.path.exists("e.safetensors") else "FAIL"))
for dev in ("cpu", "cuda"):
    try:
        s = json.load(open(f"step-{dev}.json"))
        rows.append((f"full step on {dev} (samples/s, median s)", f"{s['samples_per_s']} / {s['median_step_s']}", "ok"))
    except Exception as e:
        ok = False; rows.append((f"full step on {dev}", repr(e), "FAIL"))
print("\n| check | value | |\n|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
raise SystemExit(0 if ok else 1)
EOF
  return $status
}

case "$mode" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: gpu-check.sh pack|run [DIR]" >&2; exit 2 ;;
esac
