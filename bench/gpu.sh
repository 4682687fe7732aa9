#!/usr/bin/env bash
# The GPU figures in one command, on a CUDA host with Python 3.12 and its own PyTorch (no package index there).
#
#   bash bench/gpu.sh --prepare   # here, on a machine with an index: wheels -> .whl/ (46 MB), haproxy -> .deb/
#   bash bench/gpu.sh             # on the CUDA host, from the repository root (carry .whl and .deb along)
#   bash bench/gpu.sh --photos    # the same on bench/photos.py's phone photos (carry .photos too, 17 MB): the
#                                 # load bench and the breakdown on photos, a breakdown with --gpu-decode (nvJPEG),
#                                 # and the CPU micro-bench of the upload path; no decoder bench
#   bash bench/gpu.sh --fairness  # issue 13's fairness figures on the GPU, nothing else (at most 8.5 minutes):
#                                 # bench/fairness_floor.py (the batch cost curve up to 64 and its replay), then
#                                 # bench/fairness.py against serve --device cuda (fair and fifo), with the
#                                 # default --preempt-share 0.5 and with 0
#
# With the device tool: run `bash bench/gpu.sh --prepare` here, then
#   run(command="OUT=$OUT bash bench/gpu.sh", carry=[".whl", ".deb"], timeout_s=600)
#   run(command="OUT=$OUT bash bench/gpu.sh --photos", carry=[".whl", ".deb", ".photos"], timeout_s=600)
#   run(command="OUT=$OUT bash bench/gpu.sh --fairness", carry=[".whl"], timeout_s=600)
# Everything it measures lands in $OUT/gpu-results.tgz, one file (the tool brings back at most 8), plus the
# summary $OUT/summary.md. Each step has its own time limit (synth 90 s, load check 60, load bench 300, breakdown
# 75, decoder 45: about 9.5 minutes at most with the install), the issue's figures come first, a failed step is
# noted, not fatal, and the tarball is rewritten after every step, so a run stopped at the tool's 600 s keeps
# what it did.
#
# Steps: install the wheels into /tmp/site; unpack Debian's HAProxy into /tmp/haproxy-root (if it cannot run
# there, the cluster rows are left out and summary.md says why); write the mPLUG-large replica in FP16 (504 px);
# load it once and record load time and GPU memory; bench/run.py --systems serve,cluster,ceiling at concurrency
# 1, 32, 128, with each process's GPU memory sampled under load and the model FLOP utilisation of every row;
# bench/breakdown.py at concurrency 128; bench/decoder.py (reference vs fast).
#
# Knobs for a dry run on a CPU box (SKIP_INSTALL=1 DEVICE=cpu PRESET=demo REQUESTS=64 LEVELS=1,8,32 bash
# bench/gpu.sh ran every step here in 90 s; SKIP_INSTALL=1 DEVICE=cpu PRESET=photo504 REQUESTS=28 LEVELS=1,8
# VQA_PHOTOS_DIR=/tmp/vqa-async-photos-v1 bash bench/gpu.sh --photos in 5 min; it has not yet run on a GPU):
# DEVICE (cuda), PRESET (large), REQUESTS (512 per level), LEVELS (1,32,128), SKIP_INSTALL, REPLICA, OUT.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  bash ../shared/gpu/fetch-wheels.sh .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl prometheus-client==0.26.0 uvloop==0.23.0 tqdm matplotlib contourpy cycler fonttools kiwisolver pyparsing
  mkdir -p .deb && (cd .deb && apt-get download haproxy liblua5.3-0 libopentracing-c-wrapper0 libopentracing1 2>/dev/null \
    || apt-get download haproxy liblua5.3-0)
  python3 bench/photos.py .photos >/dev/null  # scikit-image is not on the CUDA host: carry the built set
  echo "prepared .whl/, .deb/ and .photos/; carry them to the CUDA host"
  exit 0
fi

PHOTOS=""
FAIRNESS=""
[[ "${1:-}" == "--fairness" ]] && FAIRNESS=1
if [[ "${1:-}" == "--photos" ]]; then
  PHOTOS=1
  export VQA_PHOTOS_DIR=${VQA_PHOTOS_DIR:-$PWD/.photos}  # bench/photos.py reads the set from there
fi
IMAGES=()
[[ -n $PHOTOS ]] && IMAGES=(--images photos)
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-large}
REQUESTS=${REQUESTS:-512}
LEVELS=${LEVELS:-1,32,128}
OUT=${OUT:-bench/out-gpu}
WORK=$(mktemp -d /tmp/vqa-gpu-XXXX)  # everything measured, tarred into $OUT at the end
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
pack() { tar czf "$OUT/gpu-results.tgz" -C "$WORK" . 2>/dev/null; }
trap 'pack; note "results: $OUT/gpu-results.tgz"' EXIT
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, note how it went, pack, keep going
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@"; then note "- $name: ok in $((SECONDS - t0)) s"
  else note "- $name: FAILED (exit $?; 124 = over its ${limit} s) after $((SECONDS - t0)) s"; fi
  pack  # so that a run killed later (the device tool stops a command at 600 s) still brings back what was done
}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if ! command -v haproxy >/dev/null && [[ -d .deb ]]; then
  mkdir -p /tmp/haproxy-root
  for f in .deb/*.deb; do dpkg -x "$f" /tmp/haproxy-root; done
  export PATH=/tmp/haproxy-root/usr/sbin:$PATH
  export LD_LIBRARY_PATH=/tmp/haproxy-root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
fi
SYSTEMS=serve,cluster,ceiling
if haproxy -v >"$WORK/haproxy-version.txt" 2>&1; then
  note "haproxy: $(head -1 "$WORK/haproxy-version.txt")"
else
  SYSTEMS=serve,ceiling
  note "haproxy does not run here, so the cluster rows are missing: $(tail -3 "$WORK/haproxy-version.txt" | tr '\n' ' ')"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  | tee "$WORK/gpu.txt" >>"$SUMMARY"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

if [[ -n $FAIRNESS ]]; then  # the demo model (fairness.py's serve loads it), the GPU's max batch of 64
  step "fairness floor (cost curve and replay)" 150 bash -c "python3 bench/fairness_floor.py --device $DEVICE \
    --max-batch-size 64 --shared 48,32,16 2>\"$WORK/fairness_floor.log\" | tee \"$WORK/fairness_floor.json\""
  grep -E '^(fifo|fair|  (vision|decoder):)' "$WORK/fairness_floor.log" >>"$SUMMARY"
  for share in 0.5 0; do  # the default, then no preemption (the bulk client's rate first)
    step "fairness bench (serve --device $DEVICE --preempt-share $share, fair then fifo)" 180 bash -c \
      "python3 bench/fairness.py --seconds 10 --serve-args '--device $DEVICE --torch-threads 1 --preempt-share \
      $share' 2>\"$WORK/fairness-$share.log\" | tee \"$WORK/fairness-$share.json\""
    { echo "preempt-share $share"; tail -5 "$WORK/fairness-$share.log"; tail -1 "$WORK/fairness-$share.json"; } \
      >>"$SUMMARY" 2>/dev/null
  done
  exit 0
fi
REPLICA=${REPLICA:-/tmp/mplug-$PRESET-fp16}
export REPLICA DEVICE WORK SUMMARY
[[ -f $REPLICA/model.safetensors ]] || step "synth $PRESET replica" 90 \
  python3 -m vqa_async.cli synth --preset "$PRESET" "$REPLICA" --dtype float16

load_check() {  # load time and memory of one process
  python3 - "$REPLICA" "$DEVICE" <<'PY' | tee "$WORK/load.json" >>"$SUMMARY"
import json, sys, time, torch
from vqa_async.model.loader import load_model
from vqa_async.model.answer import Answerer
t = time.perf_counter(); m = load_model(sys.argv[1], device=sys.argv[2]); load_s = time.perf_counter() - t
a = Answerer(m.model, m.tokenizer, m.device, m.dtype, decoder="fast")
px = [torch.zeros(3, m.image_res, m.image_res)] * 16
a.answer(px, list(range(16)), m.tokenizer.encode(["what is in the picture?"] * 16))
cuda = m.device.type == "cuda"
if cuda:
    torch.cuda.synchronize()
print(json.dumps({"load_s": round(load_s, 2), "image_res": m.image_res, "dtype": str(m.dtype),
                  "weights_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if cuda else None,
                  "peak_gib_batch16": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}))
PY
}
export -f load_check
step "load check" 60 bash -c load_check

sample_memory() {  # each process's GPU memory and the GPU's total, every 5 s while the load bench runs
  while sleep 5; do
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader 2>/dev/null \
      | sed "s/^/$(date +%T), /" >>"$WORK/gpu-memory-per-process.csv"
    nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null \
      | sed "s/^/$(date +%T), /" >>"$WORK/gpu-memory-total.csv"
  done
}
sample_memory &
SAMPLER=$!
step "load bench ($SYSTEMS at $LEVELS, $REQUESTS requests per level${PHOTOS:+, photos})" 300 \
  python3 bench/run.py --systems "$SYSTEMS" --concurrency "$LEVELS" --requests "$REQUESTS" --model "$REPLICA" \
  --device "$DEVICE" --decoder fast --workers 2 --out "$WORK/bench" "${IMAGES[@]}"
kill $SAMPLER 2>/dev/null
cat "$WORK/bench/results.md" >>"$SUMMARY" 2>/dev/null
{ echo; echo "GPU memory per process (largest seen under load, MiB; empty where nvidia-smi lists no processes):"
  awk -F', ' '{v = $4 + 0; k = $2 " " $3; if (v > m[k]) m[k] = v} END {for (k in m) print "  " k ": " m[k]}' \
    "$WORK/gpu-memory-per-process.csv" 2>/dev/null
  echo "GPU memory in use, all processes (largest seen under load, MiB):"
  awk -F', ' '{v = $2 + 0; if (v > m) m = v} END {print "  " m + 0}' "$WORK/gpu-memory-total.csv" 2>/dev/null
} | tee -a "$SUMMARY"

# Model FLOP utilisation: about 1.02 TFLOP per answer for mPLUG-large with a decoder that does not recompute,
# against the H100/H200 SXM dense FP16 tensor peak of 989 TFLOP/s.
python3 - "$WORK/bench/results.json" "$PRESET" <<'PY' | tee -a "$SUMMARY"
import json, sys
for r in json.load(open(sys.argv[1])):
    mfu = f"MFU {r['answers_per_s'] * 1.02e12 / 989e12:.1%} (of 989 TFLOP/s)" if sys.argv[2] == "large" else ""
    print(f"{r['system']:8s} c={r['concurrency']:4d} {r['answers_per_s']:8.1f} answers/s  P95 {r['p95_ms']:7.1f} ms  "
          f"failures {r['failures']}  {mfu}")
PY

# Where the time goes per batch at the top concurrency through HAProxy (the vision stage is GPU time: the
# executor synchronizes after it).
TOP=${LEVELS##*,}
if [[ $SYSTEMS == *cluster* ]]; then
  step "breakdown at concurrency $TOP" 75 python3 bench/breakdown.py --system cluster --workers 2 --concurrency "$TOP" \
    --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" --out "$WORK/breakdown" "${IMAGES[@]}"
  if [[ -n $PHOTOS ]]; then  # nvJPEG decode and resize on the device, against the CPU's reduced-scale decode
    step "breakdown at concurrency $TOP, --gpu-decode" 75 python3 bench/breakdown.py --system cluster --workers 2 \
      --concurrency "$TOP" --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" \
      --out "$WORK/breakdown-gpu-decode" --images photos --gpu-decode
    cat "$WORK/breakdown-gpu-decode/breakdown.md" >>"$SUMMARY" 2>/dev/null
  fi
else
  step "breakdown at concurrency $TOP (serve)" 75 python3 bench/breakdown.py --system serve --concurrency "$TOP" \
    --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" --out "$WORK/breakdown" "${IMAGES[@]}"
fi
cat "$WORK/breakdown/breakdown.md" >>"$SUMMARY" 2>/dev/null

decoder_bench() {
  python3 bench/decoder.py --model "$REPLICA" --device "$DEVICE" --batch 64 --n 256 2>"$WORK/decoder.log" | tail -1 \
    | tee "$WORK/decoder.json" >>"$SUMMARY"
}
export -f decoder_bench
if [[ -n $PHOTOS ]]; then
  step "upload path micro-bench (CPU, one core)" 60 bash -c \
    "python3 bench/photo_decode.py --repeat 3 | tee \"$WORK/photo_decode.txt\" >>\"$SUMMARY\""
else
  step "decoder bench" 45 bash -c decoder_bench
fi
