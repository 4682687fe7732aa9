#!/usr/bin/env bash
# The GPU figures in one command, on a CUDA host with Python 3.12 and its own PyTorch (no package index there).
#
#   bash bench/gpu.sh --prepare   # here, on a machine with an index: wheels -> .whl/ (46 MB), haproxy -> .deb/
#   bash bench/gpu.sh             # on the CUDA host, from the repository root (carry .whl and .deb along)
#   bash bench/gpu.sh --photos    # the same on bench.lib.photos' phone photos (carry .photos too, 17 MB): the
#                                 # load bench and the breakdown on photos, a breakdown with --gpu-decode (nvJPEG),
#                                 # and the CPU micro-bench of the upload path; no decoder bench
#   bash bench/gpu.sh --fairness  # issue 13's fairness figures on the GPU, nothing else (at most 8.5 minutes):
#                                 # `python -m bench fairness-replay` (the batch cost curve up to 64 and its
#                                 # replay), then `python -m bench fairness` against serve --device cuda (fair,
#                                 # fifo and --preempt-share 0, one repeat each)
#   bash bench/gpu.sh --dry-run   # seconds on a CPU: the demo model, serve and ceiling at levels 1,2, the FLOP
#                                 # count and MFU against a stated 1 TFLOP/s (tests/test_bench.py runs it)
#
# With the device tool: run `bash bench/gpu.sh --prepare` here, then
#   run(command="OUT=$OUT bash bench/gpu.sh", carry=[".whl", ".deb"], timeout_s=600)
#   run(command="OUT=$OUT bash bench/gpu.sh --photos", carry=[".whl", ".deb", ".photos"], timeout_s=600)
#   run(command="OUT=$OUT bash bench/gpu.sh --fairness", carry=[".whl"], timeout_s=600)
# Everything it measures lands in $OUT/gpu-results.tgz, one file (the tool brings back at most 8), plus the
# summary $OUT/summary.md. Each step has its own time limit (synth 90 s, load check 60, load bench 300, FLOPs 45,
# breakdown 75, decoder 45: about 10 minutes at most with the install), the issue's figures come first, a failed
# step is noted, not fatal, and the tarball is rewritten after every step, so a run stopped at the tool's 600 s
# keeps what it did.
#
# Steps: install the wheels into /tmp/site; unpack Debian's HAProxy into /tmp/haproxy-root (if it cannot run
# there, the cluster rows are left out and summary.md says why); write the mPLUG-large replica in FP16 (504 px);
# load it once and record load time and GPU memory; `python -m bench sweep --workload distinct` (every upload
# new: no cache hit or dedup helps any row) with serve, cluster and ceiling at concurrency 1, 32, 128, REPEATS
# times, each process's GPU memory sampled under load; `python -m bench flops`: the FLOPs of one real batch on the
# replica at its input size and answer length (torch's FlopCounterMode), and each row's MFU = its answers/s x
# FLOPs per answer / the GPU's stated dense FP16 peak (the datasheet line is printed; PEAK_TFLOPS and
# PEAK_SOURCE override it); `python -m bench breakdown` at concurrency 128; `python -m bench decoder`.
#
# Knobs for a dry run on a CPU box (SKIP_INSTALL=1 DEVICE=cpu PRESET=demo REQUESTS=64 LEVELS=1,8,32 bash
# bench/gpu.sh runs every step on the CPU; SKIP_INSTALL=1 DEVICE=cpu PRESET=photo504 REQUESTS=28 LEVELS=1,8
# VQA_PHOTOS_DIR=/tmp/vqa-async-photos-v1 bash bench/gpu.sh --photos): DEVICE (cuda), PRESET (large), REQUESTS
# (512 per level), LEVELS (1,32,128), REPEATS (3), SYSTEMS, SKIP_INSTALL, REPLICA, OUT, PEAK_TFLOPS, PEAK_SOURCE.
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
  python3 -m bench photos .photos >/dev/null  # scikit-image is not on the CUDA host: carry the built set
  echo "prepared .whl/, .deb/ and .photos/; carry them to the CUDA host"
  exit 0
fi

PHOTOS=""
FAIRNESS=""
DRY=""
[[ "${1:-}" == "--fairness" ]] && FAIRNESS=1
if [[ "${1:-}" == "--photos" ]]; then
  PHOTOS=1
  export VQA_PHOTOS_DIR=${VQA_PHOTOS_DIR:-$PWD/.photos}  # bench.lib.photos reads the set from there
fi
if [[ "${1:-}" == "--dry-run" ]]; then  # the whole path on a CPU in seconds: what CI runs
  DRY=1 SKIP_INSTALL=1 DEVICE=cpu PRESET=demo REQUESTS=${REQUESTS:-8} LEVELS=${LEVELS:-1,2} REPEATS=${REPEATS:-1}
  SYSTEMS=${SYSTEMS:-serve,ceiling} REPLICA=${REPLICA:-$PWD/vqa_async/demo} PEAK_TFLOPS=${PEAK_TFLOPS:-1} PEAK_SOURCE=${PEAK_SOURCE:-"dry run: a made-up 1 TFLOP/s"}
fi
IMAGES=()
[[ -n $PHOTOS ]] && IMAGES=(--images photos)
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-large}
REQUESTS=${REQUESTS:-512}
LEVELS=${LEVELS:-1,32,128}
REPEATS=${REPEATS:-3}
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
SYSTEMS=${SYSTEMS:-serve,cluster,ceiling}
if haproxy -v >"$WORK/haproxy-version.txt" 2>&1; then
  note "haproxy: $(head -1 "$WORK/haproxy-version.txt")"
else
  SYSTEMS=${SYSTEMS//cluster,/}
  note "haproxy does not run here, so the cluster rows are missing: $(tail -3 "$WORK/haproxy-version.txt" | tr '\n' ' ')"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"; } \
  | tee "$WORK/gpu.txt" >>"$SUMMARY"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$SUMMARY"

if [[ -n $FAIRNESS ]]; then  # the demo model (fairness.py's serve loads it), the GPU's max batch of 64
  step "fairness replay (cost curve and replay)" 150 bash -c "python3 -m bench fairness-replay --device $DEVICE \
    --max-batch-size 64 --shared 48,32,16 2>\"$WORK/fairness_replay.log\" | tee \"$WORK/fairness_replay.json\""
  grep -E '^(fifo|fair|  (vision|decoder):)' "$WORK/fairness_replay.log" >>"$SUMMARY"
  # The default, fifo and no preemption, each phase 10 s, one repeat (three serves: 9 phases of 11 s).
  step "fairness bench (serve --device $DEVICE: fair, fifo, share0)" 300 bash -c \
    "python3 -m bench fairness --seconds 10 --repeats 1 --settings fair,fifo,share0 --serve-args '--device $DEVICE \
    --torch-threads 1' 2>\"$WORK/fairness.log\" | tee \"$WORK/fairness.json\""
  { tail -4 "$WORK/fairness.log"; tail -1 "$WORK/fairness.json"; } >>"$SUMMARY" 2>/dev/null
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
[[ -z $DRY ]] && step "load check" 60 bash -c load_check

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
step "load bench ($SYSTEMS at $LEVELS, distinct, $REQUESTS requests per row, $REPEATS repeats${PHOTOS:+, photos})" \
  300 python3 -m bench sweep --systems "$SYSTEMS" --concurrency "$LEVELS" --requests "$REQUESTS" --repeats "$REPEATS" \
  --workload distinct --model "$REPLICA" --device "$DEVICE" --decoder fast --workers 2 --out "$WORK/bench" \
  "${IMAGES[@]}"
kill $SAMPLER 2>/dev/null
cat "$WORK/bench/results.md" >>"$SUMMARY" 2>/dev/null
{ echo; echo "GPU memory per process (largest seen under load, MiB; empty where nvidia-smi lists no processes):"
  awk -F', ' '{v = $4 + 0; k = $2 " " $3; if (v > m[k]) m[k] = v} END {for (k in m) print "  " k ": " m[k]}' \
    "$WORK/gpu-memory-per-process.csv" 2>/dev/null
  echo "GPU memory in use, all processes (largest seen under load, MiB):"
  awk -F', ' '{v = $2 + 0; if (v > m) m = v} END {print "  " m + 0}' "$WORK/gpu-memory-total.csv" 2>/dev/null
} | tee -a "$SUMMARY"

# Model FLOP utilisation, measured: the FLOPs of one real batch on the replica (FlopCounterMode), times each row's
# answers/s, over the GPU's stated peak (its datasheet line is printed, or PEAK_TFLOPS with PEAK_SOURCE).
PEAK=()
[[ -n ${PEAK_TFLOPS:-} ]] && PEAK=(--peak-tflops "$PEAK_TFLOPS" --peak-source "${PEAK_SOURCE:-given as PEAK_TFLOPS}")
step "FLOPs per answer and MFU" 45 bash -c "python3 -m bench flops --model \"$REPLICA\" --device $DEVICE --batch 16 \
  --results \"$WORK/bench/results.json\" ${IMAGES[*]} ${PEAK[*]@Q} 2>\"$WORK/flops.log\" >\"$WORK/flops.json\""
grep -v Warning "$WORK/flops.log" | grep -E 'GFLOP|peak|answers/s' | tee -a "$SUMMARY"
[[ -n $DRY ]] && exit 0

# Where the time goes per batch at the top concurrency through HAProxy (the vision stage is GPU time: the
# executor synchronizes after it).
TOP=${LEVELS##*,}
if [[ $SYSTEMS == *cluster* ]]; then
  step "breakdown at concurrency $TOP" 75 python3 -m bench breakdown --system cluster --workers 2 --concurrency "$TOP" \
    --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" --out "$WORK/breakdown" "${IMAGES[@]}"
  if [[ -n $PHOTOS ]]; then  # nvJPEG decode and resize on the device, against the CPU's reduced-scale decode
    step "breakdown at concurrency $TOP, --gpu-decode" 75 python3 -m bench breakdown --system cluster --workers 2 \
      --concurrency "$TOP" --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" \
      --out "$WORK/breakdown-gpu-decode" --images photos --gpu-decode
    cat "$WORK/breakdown-gpu-decode/breakdown.md" >>"$SUMMARY" 2>/dev/null
  fi
else
  step "breakdown at concurrency $TOP (serve)" 75 python3 -m bench breakdown --system serve --concurrency "$TOP" \
    --requests "$((REQUESTS * 2))" --model "$REPLICA" --device "$DEVICE" --out "$WORK/breakdown" "${IMAGES[@]}"
fi
cat "$WORK/breakdown/breakdown.md" >>"$SUMMARY" 2>/dev/null

decoder_bench() {
  python3 -m bench decoder --model "$REPLICA" --device "$DEVICE" --batch 64 --n 256 2>"$WORK/decoder.log" | tail -1 \
    | tee "$WORK/decoder.json" >>"$SUMMARY"
}
export -f decoder_bench
if [[ -n $PHOTOS ]]; then
  step "upload path micro-bench (CPU, one core)" 60 bash -c \
    "python3 -m bench upload-cpu --repeat 3 | tee \"$WORK/upload_cpu.txt\" >>\"$SUMMARY\""
else
  step "decoder bench" 45 bash -c decoder_bench
fi
