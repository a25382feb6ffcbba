#!/usr/bin/env bash
# Side-by-side loader benchmark: vlp against the Python peer (webdataset + PIL +
# torchvision + tokenizers in a torch DataLoader) on the same shards, same cores.
#
#   scripts/bench_loader.sh PEER_DIR PYTHON [SHARD_DIR]
#
# PEER_DIR holds py_loader.py; PYTHON has its requirements (torch, torchvision,
# webdataset, tokenizers, pillow) and scikit-image. SHARD_DIR (default /tmp/photo) gets
# the photo-like shards from scripts/make_photo_shards.py if it has none yet.
set -euo pipefail
peer_dir=$1
python=$2
shards=${3:-/tmp/photo}
cd "$(dirname "$0")/.."
cargo build --release --quiet
vlp=target/release/vlp
[ -f "$shards/photo-manifest.json" ] || "$python" scripts/make_photo_shards.py --out "$shards" --vlp "$vlp"
spec="$shards/photo-{000000..000003}.tar"
tok="$shards/tokenizer.json"
uptime
for round in 1 2; do
  echo "== round $round: vlp, 2 workers"
  RUST_LOG=warn "$vlp" bench loader "$spec" --tokenizer "$tok" --seconds 20 --decode-seconds 10 | tail -1
  echo "== round $round: peer, 2 workers"
  "$python" "$peer_dir/py_loader.py" "$spec" --tokenizer "$tok" --seconds 20 2>/dev/null | tail -1
done
echo "== vlp, 1 worker"
RUST_LOG=warn "$vlp" bench loader "$spec" --tokenizer "$tok" --seconds 20 --decode-seconds 0 --workers 1 | tail -1
echo "== peer, 1 worker"
"$python" "$peer_dir/py_loader.py" "$spec" --tokenizer "$tok" --seconds 20 --workers 1 2>/dev/null | tail -1
for buf in 100 4000; do
  echo "== vlp, shuffle buffer $buf"
  RUST_LOG=warn "$vlp" bench loader "$spec" --tokenizer "$tok" --seconds 20 --decode-seconds 0 --shuffle-buffer "$buf" | tail -1
done
echo "== vlp, 60 s (memory does not grow with time)"
RUST_LOG=warn "$vlp" bench loader "$spec" --tokenizer "$tok" --seconds 60 --decode-seconds 0 | tail -1
