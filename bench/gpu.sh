#!/usr/bin/env bash
# The GPU figures in one command, on a CUDA host with Python 3.12 and its own PyTorch (no package index there).
#
#   bash bench/gpu.sh --prepare   # here, on a machine with an index: wheels -> .whl/, Debian's haproxy -> .deb/
#   bash bench/gpu.sh             # on the CUDA host, from the repository root (carry .whl and .deb along)
#
# It installs the wheels into /tmp/site, unpacks HAProxy into /tmp/haproxy-root, writes the full-size mPLUG-large
# replica in FP16, and runs: the decoder bench (reference vs fast), the load bench (serve, cluster, ceiling at
# concurrency 1, 32, 128), records GPU memory per worker, and profiles the cluster at concurrency 128.
# Everything lands in ${OUT:-bench/out-gpu}.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  bash ../shared/gpu/fetch-wheels.sh .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl prometheus-client==0.26.0 uvloop==0.23.0 tqdm matplotlib contourpy cycler fonttools kiwisolver pyparsing
  mkdir -p .deb && (cd .deb && apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 2>/dev/null \
    || apt-get download haproxy liblua5.3-0)
  echo "prepared .whl/ and .deb/; carry both to the CUDA host"
  exit 0
fi

OUT=${OUT:-bench/out-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
if ! command -v haproxy >/dev/null; then
  mkdir -p /tmp/haproxy-root
  for f in .deb/*.deb; do dpkg -x "$f" /tmp/haproxy-root; done
  export PATH=/tmp/haproxy-root/usr/sbin:$PATH
  export LD_LIBRARY_PATH=/tmp/haproxy-root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
haproxy -v | head -1 || echo "haproxy does not run here: the cluster row will be missing"

nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
REPLICA=${REPLICA:-/tmp/mplug-large-fp16}
[[ -f $REPLICA/model.safetensors ]] || python3 -m vqa_async.cli synth --preset large "$REPLICA" --dtype float16

# load time and memory of one process on the GPU
python3 - "$REPLICA" <<'PY' | tee "$OUT/load.json"
import json, sys, time, torch
from vqa_async.model.loader import load_model
from vqa_async.model.answer import Answerer
t = time.perf_counter(); m = load_model(sys.argv[1], device="cuda"); load_s = time.perf_counter() - t
a = Answerer(m.model, m.tokenizer, m.device, m.dtype)
px = [torch.zeros(3, m.image_res, m.image_res)] * 16
a.answer(px, list(range(16)), m.tokenizer.encode(["what is in the picture?"] * 16)); torch.cuda.synchronize()
print(json.dumps({"load_s": round(load_s, 2), "params_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
                  "peak_gib_batch16": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))
PY

python3 bench/decoder.py --model "$REPLICA" --device cuda --batch 64 --n 512 2>"$OUT/decoder.log" | tail -1 \
  | tee "$OUT/decoder.json" || true

python3 bench/run.py --systems serve,cluster,ceiling --concurrency 1,32,128 --requests 1024 --model "$REPLICA" \
  --device cuda --decoder fast --workers 2 --max-batch-size 64 --out "$OUT" &
BENCH=$!
sleep 120; nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee "$OUT/gpu-memory-per-process.csv"
wait $BENCH
cat "$OUT/results.md"
# Where the time goes per batch at concurrency 128 through HAProxy: decode, preprocessing, vision encoder,
# decoder (GPU time: the executor synchronizes after the vision encoder), HTTP and HAProxy.
python3 bench/breakdown.py --system cluster --workers 2 --concurrency 128 --requests 2048 --model "$REPLICA" \
  --device cuda --max-batch-size 64 --out "$OUT/breakdown" || true
# Model FLOP utilisation: about 1.02 TFLOP per answer with a decoder that does not recompute, against the
# H100/H200 SXM dense FP16 tensor peak of 989 TFLOP/s.
python3 - "$OUT/results.json" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    print(f"{r['system']:8s} c={r['concurrency']:4d} {r['answers_per_s']:8.1f} answers/s  "
          f"MFU {r['answers_per_s'] * 1.02e12 / 989e12:.1%} (of 989 TFLOP/s)")
PY
