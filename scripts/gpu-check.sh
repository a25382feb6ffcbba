#!/usr/bin/env bash
# The GPU checks in one call.
#
#   scripts/gpu-check.sh pack [DIR]   here (no GPU needed; nvcc, CUDA_HOME and
#                                     CUDA_COMPUTE_CAP set, see scripts/cuda-toolchain.sh):
#                                     builds `vlp` and the CUDA test binaries with the `cuda`
#                                     feature, strips and compresses them into DIR (default
#                                     gpu-carry/, ignored by git, well under 64 MiB). With
#                                     PEERS=/path/to/peer/programs, the PyTorch peers
#                                     (torch_gpu_ops.py, torch_albef_step.py,
#                                     torch_albef_eval.py) are copied along for the timings.
#   scripts/gpu-check.sh run [DIR]    on a machine with an NVIDIA GPU and driver (no Rust, no
#                                     network), from the repository root: every check, then
#                                     one table, within GPU_CHECK_SECONDS (default 480; each
#                                     check gets at most what is left). The logs and JSON
#                                     results also go to $OUT/gpu-check.tgz when $OUT is set.
#
# Checks, in order (each under its own time limit; a failure marks the row and goes on):
#   1. every CUDA kernel test (forward and backward against the CPU ops in f64; masks,
#      ragged lengths, odd sizes; f32 within 2e-5, bf16 within 2e-2 of the largest value);
#   2. the loss-parity test on the GPU in f32 (losses within 1e-4 of the PyTorch reference);
#   3. the same tiny pretraining run on the CPU and on CUDA in f32 (losses agree to f32
#      noise) and on CUDA in bf16 (agrees with f32 to bf16 noise); again on CPU and CUDA
#      with softer ITM negatives on a ramp and ITM distilled into ITC; eval, embed on CUDA;
#   4. NCCL on this one GPU (world size 1, forced with VLP_DIST_BACKEND=nccl): the
#      communicator starts, the CUDA f32 run through it equals the single-process run bit
#      for bit, and ALBEF-base's gradient all-reduce is timed (`vlp bench allreduce`);
#   5. timings side by side with the peers on this GPU: the operators (`vlp bench ops` vs
#      torch_gpu_ops.py), the full ALBEF-base step in bf16 at batch 64, and ALBEF-base
#      retrieval evaluation at 384 px with k = 128.
set -euo pipefail
mode=${1:?usage: gpu-check.sh pack|run [DIR]}
DIR=${2:-gpu-carry}

pack() {
  : "${CUDA_COMPUTE_CAP:=90}"
  export CUDA_COMPUTE_CAP
  local features=${FEATURES:-cuda,nccl}
  cargo build --release --features "$features"
  local tests
  tests=$(cargo test --release --features "$features" --no-run --message-format=json \
      -p vlp-models --lib -p vlp-train --test parity 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        # Named by package and target: two packages have a `parity` test.
        pid = m["package_id"]
        tail = pid.split("#")[-1]
        package = tail.split("@")[0] if "@" in tail else pid.split("#")[0].rstrip("/").split("/")[-1]
        name = m["target"]["name"]
        print((name if name == package.replace("-", "_") else package + "-" + name) + " " + m["executable"])')
  rm -rf "$DIR"; mkdir -p "$DIR/bin"
  strip -o "$DIR/bin/vlp" target/release/vlp
  while read -r name exe; do
    strip -o "$DIR/bin/test-$name" "$exe"
  done <<< "$tests"
  xz -T0 -6 -f "$DIR"/bin/*
  # Test binaries find their fixtures under the path the repository had here.
  pwd > "$DIR/build-root"
  if [ -n "${PEERS:-}" ]; then
    mkdir -p "$DIR/peers"
    cp "$PEERS"/torch_gpu_ops.py "$PEERS"/torch_albef_step.py "$PEERS"/torch_albef_eval.py "$DIR/peers/"
  fi
  # The CPU/CUDA agreement run: the `tiny` preset at 64 px, a 200-token vocabulary.
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
total_steps = 8

[run]
out_dir = "run"
seed = 7
log_every = 1
save_every = 0

[eval]
sets = [{ name = "val", shards = "val-000000.tar" }]
k_test = 8
EOF
  # ALBEF-base at 384 px in the format both `vlp bench eval --config` and the peer read.
  cat > "$DIR/albef-base-384.json" <<'EOF'
{
  "vision": {"image_size": 384, "patch_size": 16, "hidden": 768, "layers": 12, "heads": 12, "mlp_ratio": 4.0, "eps": 1e-6},
  "text": {"vocab_size": 30522, "hidden": 768, "layers": 12, "fusion_layers": 6, "heads": 12, "intermediate": 3072,
           "max_positions": 512, "eps": 1e-12, "dropout": 0.1,
           "pad_id": 0, "cls_id": 101, "sep_id": 102, "mask_id": 103},
  "embed_dim": 256, "temp": 0.07, "momentum": 0.995, "queue_size": 65536, "alpha": 0.4,
  "mlm_probability": 0.15, "lr": 1e-4, "weight_decay": 0.02, "batch_size": 64,
  "max_len": 30, "min_len": 8, "seed": 0
}
EOF
  du -sh "$DIR"
}

run() {
  local here bin root status=0
  here=$(cd "$DIR" && pwd)
  bin=$(mktemp -d)
  for f in "$here"/bin/*.xz; do xz -dc "$f" > "$bin/$(basename "${f%.xz}")"; done
  chmod +x "$bin"/*
  root=$(cat "$here/build-root")
  if [ ! -e "$root" ]; then mkdir -p "$(dirname "$root")" && ln -s "$(pwd)" "$root"; fi
  local libs=""
  for d in /usr/local/nvidia/lib64 /usr/local/cuda/lib64 /usr/local/cuda-*/targets/x86_64-linux/lib; do
    [ -d "$d" ] && libs="$libs:$d"
  done
  for sp in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
    for d in "$sp"/nvidia/*/lib "$sp"/nvidia/cu13/lib; do [ -d "$d" ] && libs="$libs:$d"; done
  done
  export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local V="$bin/vlp" work
  local deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
  # lim N: N seconds, or what is left of the budget when that is less (at least 5).
  lim() { local left=$((deadline - SECONDS)); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  work=$(mktemp -d); cd "$work"
  echo "== 1. CUDA kernel tests"
  timeout $(lim 120) "$bin/test-vlp_models" fused::cuda_tests --test-threads 1 --nocapture \
    > kernels.log 2>&1 || status=1
  grep -E "^test |test result|forward|grad|panicked" kernels.log | tail -80
  echo "== 2. parity on the GPU (model outputs vs HF/timm; ALBEF losses vs PyTorch)"
  : > parity.log
  for t in "$bin"/test-*parity; do
    timeout $(lim 60) "$t" --nocapture >> parity.log 2>&1 || status=1
  done
  grep -E "parity|test result|panicked" parity.log | head -30
  echo "== 3. pretraining: CPU f32, CUDA f32, CUDA bf16"
  cp "$here/recipe.toml" .
  "$V" shards synth --out train --count 256 --per-shard 64 --image-size 64 --seed 1 >/dev/null
  "$V" shards synth --out val --count 64 --per-shard 64 --image-size 64 --seed 2 >/dev/null
  "$V" tokenizer train 'train-{000000..000003}.tar' --out tok.json --vocab-size 200 >/dev/null
  # ":distill" runs add softer ITM negatives on a ramp, on half of each batch, through the
  # fusion layers alone, and ITM distilled into ITC (self teacher): the fused attention's
  # backward with one query row (ITM on [CLS]) and the teacher pass.
  local distill=(--set objectives.itm.hardness=0.5 --set objectives.itm.hardness_ramp_steps=4
    --set objectives.itm.batch_fraction=0.5 --set objectives.itm.fusion_only=true
    --set 'objectives.distill={enabled=true,kind="kl",candidates=4,teacher_temperature=0.5,teacher_score="itm+itc"}')
  for run in cpu:f32 cuda:f32 cuda:bf16 cpu:f32:distill cuda:f32:distill; do
    local dev dt variant name extra=()
    IFS=: read -r dev dt variant <<< "$run"
    name=$dev-$dt${variant:+-$variant}
    [ -n "$variant" ] && extra=("${distill[@]}")
    timeout $(lim 60) "$V" pretrain --recipe recipe.toml --no-progress --device "$dev" \
      --set "run.out_dir=\"$name\"" --set "run.dtype=\"$dt\"" "${extra[@]}" \
      > "$name.eval.md" 2> "$name.log" || { status=1; tail -20 "$name.log"; }
  done
  local ck=cuda-f32/checkpoints/step-000008
  timeout $(lim 40) "$V" eval retrieval --checkpoint "$ck" --shards val-000000.tar --tokenizer tok.json \
    --device cuda --k-test 8 --score itm+itc-logit --no-progress --out eval.json > /dev/null 2> eval.log || { status=1; tail -5 eval.log; }
  printf 'a red circle\na blue square\n' > texts.txt
  timeout $(lim 30) "$V" embed --checkpoint "$ck" --texts texts.txt --tokenizer tok.json --out e.safetensors \
    --device cuda 2> embed.log || { status=1; tail -5 embed.log; }
  echo "== 4. NCCL at world size 1"
  timeout $(lim 60) env VLP_DIST_BACKEND=nccl "$V" pretrain --recipe recipe.toml --no-progress \
    --device cuda --set 'run.out_dir="cuda-nccl"' > cuda-nccl.eval.md 2> cuda-nccl.log \
    || { status=1; tail -20 cuda-nccl.log; }
  timeout $(lim 60) env VLP_DIST_BACKEND=nccl "$V" bench allreduce --device cuda --preset albef-base \
    > allreduce.json 2> allreduce.log || { status=1; tail -20 allreduce.log; }
  echo "== 5. timings against the peers (each vlp run, then its peer)"
  local peers="$here/peers"
  # OPS_DTYPE=both adds the f32 cases (twice the time).
  local dt=${OPS_DTYPE:-bf16}
  timeout $(lim 150) "$V" bench ops --device cuda --dtype "$dt" > ops-vlp.jsonl 2> ops-vlp.log || { status=1; tail -5 ops-vlp.log; }
  [ -d "$peers" ] && { timeout $(lim 90) python3 "$peers/torch_gpu_ops.py" --dtype "$dt" > ops-torch.jsonl 2> ops-torch.log || tail -5 ops-torch.log; }
  timeout $(lim 120) "$V" bench step --full --preset albef-base --batch-size 64 --text-len 30 --dtype bf16 \
    --warmup 3 --steps 10 --device cuda > step-vlp.json 2> step-vlp.log || { status=1; tail -5 step-vlp.log; }
  if [ -n "${STEP_GENERIC:-}" ]; then
    timeout $(lim 120) "$V" bench step --full --preset albef-base --batch-size 64 --text-len 30 --dtype bf16 \
      --warmup 3 --steps 10 --device cuda --attention generic > step-vlp-generic.json 2> step-vlp-generic.log \
      || { status=1; tail -5 step-vlp-generic.log; }
  fi
  [ -d "$peers" ] && { timeout $(lim 90) python3 "$peers/torch_albef_step.py" --device cuda --bf16 --batch-size 64 \
    --warmup 3 --steps 10 > step-torch.json 2> step-torch.log || tail -5 step-torch.log; }
  timeout $(lim 120) "$V" bench eval --config "$here/albef-base-384.json" --images 128 --captions-per-image 5 \
    --k 128 --score itm --no-progress --device cuda > eval-vlp.json 2> eval-vlp.log || { status=1; tail -5 eval-vlp.log; }
  [ -d "$peers" ] && { timeout $(lim 90) python3 "$peers/torch_albef_eval.py" --config "$here/albef-base-384.json" \
    --images 128 --captions-per-image 5 --k 128 --device cuda > eval-torch.json 2> eval-torch.log \
    || tail -5 eval-torch.log; }
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-check.tgz" ./*.json ./*.jsonl ./*.log ./*.md ./*/metrics.jsonl 2>/dev/null || true
  fi
  python3 - <<'EOF' || status=1
import json, os, re

rows, ok = [], True

def row(check, value, good):
    global ok
    ok &= bool(good)
    rows.append((check, value, "ok" if good else "FAIL"))

def load(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None

def lines(path):
    out = []
    if os.path.exists(path):
        for l in open(path):
            try:
                out.append(json.loads(l))
            except ValueError:
                pass
    return out

k = open("kernels.log").read() if os.path.exists("kernels.log") else ""
m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", k)
row("CUDA kernel tests (vs CPU f64; f32 2e-5, bf16 2e-2)", m.group(0) if m else "did not run", m and m.group(1) == "ok")
worst = {}
for dt, e in re.findall(r" (F32|BF16): (?:forward|grad \d) ([0-9.e+-]+)", k):
    worst[dt] = max(worst.get(dt, 0.0), float(e))
for dt, e in sorted(worst.items()):
    rows.append((f"  worst kernel error, {dt.lower()}", f"{e:.2e}", ""))
p = open("parity.log").read() if os.path.exists("parity.log") else ""
results = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", p)
on_gpu = "Cuda" in p
row("parity on the GPU, f32: model outputs vs HF/timm, ALBEF losses vs PyTorch (1e-4)", "; ".join(f"{r[0]}: {r[1]} passed, {r[2]} failed" for r in results) + ("" if on_gpu else " (NOT on the GPU)"), len(results) == 2 and all(r[0] == "ok" for r in results) and on_gpu)

def losses(d):
    f = f"{d}/metrics.jsonl"
    if not os.path.exists(f):
        return []
    rs = [json.loads(l) for l in open(f)]
    return [{k: v for k, v in r.items() if k.startswith("loss_")} for r in rs if "loss_total" in r]

a, b, c = losses("cpu-f32"), losses("cuda-f32"), losses("cuda-bf16")
if a and len(a) == len(b):
    w = max(abs(x[key] - y[key]) for x, y in zip(a, b) for key in x)
    row("pretrain 8 steps, CPU f32 vs CUDA f32: max |loss diff|", f"{w:.2e}", w < 2e-3)
else:
    row("pretrain CPU f32 vs CUDA f32", f"{len(a)} vs {len(b)} logged steps", False)
d, e = losses("cpu-f32-distill"), losses("cuda-f32-distill")
if d and len(d) == len(e) and all("loss_distill" in x for x in e):
    w = max(abs(x[key] - y[key]) for x, y in zip(d, e) for key in x)
    row("pretrain 8 steps with ITM hardness ramp + distillation, CPU vs CUDA f32: max |loss diff|", f"{w:.2e}", w < 2e-3)
else:
    row("pretrain with ITM hardness ramp + distillation, CPU vs CUDA", f"{len(d)} vs {len(e)} logged steps", False)
if b and len(b) == len(c):
    w = max(abs(x["loss_total"] - y["loss_total"]) / abs(x["loss_total"]) for x, y in zip(b, c))
    row("pretrain 8 steps, CUDA bf16 vs f32: max relative total-loss diff", f"{w:.2e}", w < 0.05)
    rows.append(("  f32 total loss by step", " ".join(f"{x['loss_total']:.3f}" for x in b), ""))
    rows.append(("  bf16 total loss by step", " ".join(f"{x['loss_total']:.3f}" for x in c), ""))
else:
    row("pretrain CUDA bf16", f"{len(c)} logged steps", False)
n = losses("cuda-nccl")
same = n == b and len(b) > 0
w = lambda d: open(f"{d}/checkpoints/step-000008/model.safetensors", "rb").read() if os.path.exists(f"{d}/checkpoints/step-000008/model.safetensors") else None
row("NCCL world size 1: losses and weights equal to the single-process CUDA run", "equal" if same and w("cuda-nccl") == w("cuda-f32") and w("cuda-f32") else f"{len(n)} steps; differ", same and w("cuda-nccl") == w("cuda-f32") and w("cuda-f32") is not None)
a_r = load("allreduce.json")
row("NCCL all-reduce of ALBEF-base's f32 gradients (world size 1)", f"{a_r['bytes'] / 1e6:.0f} MB in {a_r['median_ms']} ms, {a_r['algbw_gbps']} GB/s" if a_r else "missing", a_r is not None)
r = load("eval.json")
row("eval retrieval on CUDA, itm+itc-logit: non-finite scores", str(r.get("non_finite_scores")) if r else "missing", r is not None and r.get("non_finite_scores") == 0)
row("embed on CUDA", "ran" if os.path.exists("e.safetensors") else "missing", os.path.exists("e.safetensors"))

def key(r):
    return tuple(r.get(x) for x in ("op", "dtype", "b", "lq", "lk", "masked", "rows", "cols"))

ours = {key(r) + (r["impl"],): r for r in lines("ops-vlp.jsonl") if "op" in r}
theirs = {}
for r in lines("ops-torch.jsonl"):
    if "op" in r:
        theirs.setdefault(key(r), []).append(r)
for kk, r in ours.items():
    name = f"{r['op']} ({r['impl']}) {r['dtype']} " + (f"{r['lq']}x{r['lk']}{' masked' if r['masked'] else ''}" if r["op"] == "attention" else (f"{r.get('rows')}x{r.get('cols')}" if "rows" in r else ""))
    peer = theirs.get(kk[:-1], [])
    if r["op"] == "vit_b_stack":
        for p in lines("ops-torch.jsonl"):
            if p.get("op") == "vit_b_stack" and p.get("dtype") == r["dtype"]:
                rows.append((f"{name} vs {p['impl']}: ms vlp / torch (speed ratio)", f"{r['fwd_bwd_ms']} / {p['fwd_bwd_ms']} ({p['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x)", ""))
    elif peer:
        p = peer[0]
        rows.append((f"{name}: ms vlp / {p['impl']} (speed ratio)", f"{r['fwd_bwd_ms']} / {p['fwd_bwd_ms']} ({p['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}x)", ""))
    else:
        rows.append((f"{name}: ms vlp", str(r["fwd_bwd_ms"]), ""))
t = load("step-torch.json")
for f, what in (("step-vlp.json", "fused attention"), ("step-vlp-generic.json", "generic attention")):
    s = load(f)
    if s:
        v = f"{s['samples_per_s']} samples/s, GPU mem in use {s.get('gpu_memory_in_use_gib')} GiB"
        if t and t.get("samples_per_s"):
            v += f"; torch {t['samples_per_s']} samples/s, peak {t.get('peak_gpu_mem_mb')} MB ({s['samples_per_s'] / t['samples_per_s']:.2f}x)"
        rows.append((f"ALBEF-base full step, bf16, batch 64, {what}", v, ""))
    elif what == "fused attention" or os.environ.get("STEP_GENERIC"):
        row(f"ALBEF-base full step, {what}", "missing", False)
e, t = load("eval-vlp.json"), load("eval-torch.json")
if e:
    v = f"{e['fused_pairs_per_s']} fused pairs/s"
    if t and t.get("fused_pairs_per_s"):
        v += f"; torch {t['fused_pairs_per_s']} ({e['fused_pairs_per_s'] / t['fused_pairs_per_s']:.2f}x)"
    rows.append(("ALBEF-base eval, 384 px, k 128, 128 images", v, ""))
else:
    row("ALBEF-base eval", "missing", False)
print("\n| check | value | |\n|---|---|---|")
for r in rows:
    print("| " + " | ".join(str(x) for x in r) + " |")
raise SystemExit(0 if ok else 1)
EOF
  return $status
}

case "$mode" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: gpu-check.sh pack|run [DIR]" >&2; exit 2 ;;
esac
