#!/usr/bin/env bash
# The GPU checks of hf-asynclm, in one run (on one NVIDIA H200, 2026-12-04: part 1 took 6 minutes, the
# overhead benchmark 1.3, the latency run on the 1B-shaped model 1.7 with N_LAT=3 and 3.7 with 12 tasks):
#   1. correctness, side by side: tests/test_cuda.py (the GPU against the CPU in the same test) and
#      tests/test_training.py (the Trainer takes the GPU when there is one), while the shipped
#      cml-tiny is evaluated on the GPU with the README's commands (fp16 weights, --clock virtual:
#      compare with benchmarks/results/eval_cml-tiny-v28_200_virtual.json / _bfclpar_virtual.json,
#      the same commands on a CPU in float32);
#   2. timings, each alone on the machine: bench latency with the oracle policy on a random Llama of
#      Llama 3.2 1B's shape (real GPU decode instead of an emulated 5 ms per token), bench latency with
#      cml-tiny deciding (the README's synthetic row), and bench overhead on cml-tiny.
#
# Usage:  bash benchmarks/gpu_check.sh OUT_DIR [DEVICE]
# Needs hf-asynclm with its dev extra; bfcl-eval (pip install --no-deps bfcl-eval==2026.3.23) for the BFCL
# evaluation and BFCL latency tasks, or BFCL's data/ folder in $BFCL_DATA_DIR (without either, those are skipped and
# the latency run takes synthetic tasks).
# Writes OUT_DIR/gpu_check.tgz (every log and report) and OUT_DIR/summary.txt; set SMALL=1 for a
# quick run of the script itself (a few tasks each, e.g. on a CPU with DEVICE=cpu), PARTS=correctness,latency,overhead
# (the default) to choose parts, N_LAT and T_LAT for the tasks and the time limit (s) of the 1B latency run.
set -uo pipefail
OUT=${1:?usage: gpu_check.sh OUT_DIR [DEVICE]}
DEVICE=${2:-cuda}
W=$(mktemp -d)/gpu_check
mkdir -p "$OUT" "$W"
if command -v hf-asynclm >/dev/null; then HF=(hf-asynclm); else HF=(python3 -m hf_asynclm_cli.main); fi
if [ "${SMALL:-0}" = 1 ]; then
  N_SYN=3 N_BFCL=4 N_LAT=1 N_MODEL=1 LAT_MODEL=random TESTS=(tests/test_cuda.py)
  OVERHEAD=(--reps 1 --new-tokens 8 --interrupt-tokens 8 --context-tokens 16 --calls 2 --generations 1)
else
  N_SYN=200 N_BFCL=150 N_LAT=${N_LAT:-2} N_MODEL=12 LAT_MODEL=random-llama-1b TESTS=(tests/test_cuda.py tests/test_training.py)
  OVERHEAD=(--reps 5 --calls 10 --generations 3)
fi
PARTS=${PARTS:-correctness,latency,overhead}
# BFCL's data comes with bfcl-eval (or $BFCL_DATA_DIR); without it the BFCL evaluation is skipped and the latency run
# takes synthetic tasks
if python3 -c "from hf_asynclm.data.bfcl import bfcl_data_dir; bfcl_data_dir()" 2>/dev/null; then LAT_WORKLOAD=bfcl-parallel; else LAT_WORKLOAD=synthetic; N_BFCL=0; fi
EX="--exclude-tasks benchmarks/results/cml-tiny_bfcl_train_task_ids.json"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$W/summary.txt"; }
pack() { cp "$W/summary.txt" "$OUT/summary.txt"; tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$W")" gpu_check; }

log "device $DEVICE; $(python3 -c 'import torch, transformers; d = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"; print(f"{d}; torch {torch.__version__}, transformers {transformers.__version__}")')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$W/summary.txt"

if [[ ",$PARTS," == *,correctness,* ]]; then
  # 1. correctness (these share the machine: nothing here is a timing; 4 CPU threads each, not 16 for all)
  C=(env OMP_NUM_THREADS=4)
  "${C[@]}" python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" > "$W/pytest.log" 2>&1 &
  P_TEST=$!
  "${C[@]}" timeout 400 "${HF[@]}" eval --device "$DEVICE" --synthetic "$N_SYN" --clock virtual \
      --out "$W/eval_cml-tiny-v28_${N_SYN}_virtual_gpu.json" > "$W/eval_synthetic.txt" 2>&1 &
  P_SYN=$!
  if [ "$N_BFCL" -gt 0 ]; then
    "${C[@]}" timeout 400 "${HF[@]}" eval --device "$DEVICE" --synthetic 0 --bfcl "$N_BFCL" --bfcl-categories parallel,parallel_multiple \
        --clock virtual $EX --out "$W/eval_cml-tiny-v28_bfclpar_virtual_gpu.json" > "$W/eval_bfclpar.txt" 2>&1
    log "eval bfclpar: exit $?"
  else
    log "eval bfclpar: skipped (no BFCL data: pip install --no-deps bfcl-eval==2026.3.23, or set BFCL_DATA_DIR)"
  fi
  wait $P_SYN; log "eval synthetic: exit $?"
  wait $P_TEST; log "pytest ${TESTS[*]}: exit $? -- $(tail -n 1 "$W/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$W/pytest.log" >> "$W/summary.txt"
  for f in "$W"/eval_*.txt; do grep -E "task success|calls right|valid CML|LPT" "$f" | sed "s|^|$(basename "$f"): |" >> "$W/summary.txt"; done
  pack
fi

if [[ ",$PARTS," == *,latency,* ]]; then
  # 2. timings, one at a time (the one not yet measured on a GPU first)
  timeout "${T_LAT:-360}" "${HF[@]}" bench latency --model "$LAT_MODEL" --device "$DEVICE" --workload "$LAT_WORKLOAD" --n "$N_LAT" \
      --out "$W/latency_$LAT_MODEL" > "$W/latency_$LAT_MODEL.txt" 2>&1
  log "bench latency $LAT_MODEL on $LAT_WORKLOAD (oracle, real decode): exit $?"; pack
  timeout 200 "${HF[@]}" bench latency --policy model --device "$DEVICE" --workload synthetic --n "$N_MODEL" \
      --out "$W/latency_cml-tiny" > "$W/latency_cml-tiny.txt" 2>&1
  log "bench latency cml-tiny (model policy, real decode): exit $?"; pack
fi
if [[ ",$PARTS," == *,overhead,* ]]; then
  timeout 200 "${HF[@]}" bench overhead --device "$DEVICE" "${OVERHEAD[@]}" --out "$W/overhead_cml-tiny" > "$W/overhead.txt" 2>&1
  log "bench overhead cml-tiny: exit $?"
fi
for f in "$W"/latency_*/latency_summary*.md "$W"/overhead_cml-tiny/overhead.md; do [ -f "$f" ] && { echo "== $f"; cat "$f"; } >> "$W/summary.txt"; done
pack
log "done"
cp "$W/summary.txt" "$OUT/summary.txt"
