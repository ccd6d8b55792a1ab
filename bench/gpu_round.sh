#!/usr/bin/env bash
# One round of issue 31's GPU measurements, in stages that each fit a 10-minute device command.
# Run from the checkout's root on the GPU machine, with the wheels in .whl/ (bench/gpu.sh):
#
#   OUT=/some/dir bash bench/gpu_round.sh speed    # 7B: defaults (profiled), TRL best, levers; 8B
#   OUT=/some/dir bash bench/gpu_round.sh caps     # 24 and 16 GiB caps against TRL's fastest fits
#   OUT=/some/dir bash bench/gpu_round.sh caps-fp8 # 24 GiB: FP8 per call vs bf16 vs TRL (~5 min)
#   OUT=/some/dir bash bench/gpu_round.sh h100     # the H100 table: tests, 7B, 24 GiB, 8B (~9.5 min)
#   OUT=/some/dir bash bench/gpu_round.sh tests    # pytest -m gpu tests/trainer
#   OUT=/some/dir bash bench/gpu_round.sh fp8      # FP8 base matmuls: GPU tests, the pieces,
#                                                  # 7B bf16 vs fp8 vs TRL best (~7 min)
#   OUT=/some/dir bash bench/gpu_round.sh codes       # on an H100: the per-call e4m3 weight from
#                                                     # the 4-bit codes vs two steps (~7 min)
#   OUT=/some/dir bash bench/gpu_round.sh fp8-h200    # on an H200: tests; 7B and 8B defaults vs
#                                                     # TRL best; 7B FP8 per call (~9 min)
#   OUT=/some/dir bash bench/gpu_round.sh grouped     # tests; 7B and 8B defaults vs every layer
#                                                     # alone vs TRL best (~9.5 min)
#   OUT=/some/dir bash bench/gpu_round.sh grouped-7b  # the 7B grouped vs ungrouped only (~4 min)
#   OUT=/some/dir bash bench/gpu_round.sh h200        # on an H200: 7B, 8B defaults vs TRL best;
#                                                     # tests; 24 GiB cap (~7 min)
#   OUT=/some/dir bash bench/gpu_round.sh fp8-parity  # the loss parity of both vs TRL (~4 min)
#
# Everything lands in $OUT as it comes (results.jsonl, the profile table, every command's output
# in runs.log under a header, timeline.txt), so a command cut at its limit still leaves what it
# measured; few files, because the device returns only eight. Every comparison
# runs its baseline in the same stage, on the same card.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to a folder for the results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/timeline.txt" 2>&1
B="bash bench/gpu.sh python3 bench/qlora_throughput.py --out $OUT/results.jsonl --logging-steps 2"
T0=$(date +%s)
step() {  # step NAME COMMAND...: run, append its output to $OUT/runs.log, note the time
  local name=$1
  shift
  echo "===== $name: $*" >> "$OUT/runs.log"
  "$@" >> "$OUT/runs.log" 2>&1
  local rc=$?
  echo "[$(($(date +%s) - T0))s] $name: exit $rc" | tee -a "$OUT/timeline.txt"
}
case "${1:-}" in
  speed)  # ~8.5 min on an H100 or H200
    step 7b-defaults-profiled $B --shape llama2-7b --steps 14 --warmup 4 --modes kubetune \
      --profile-step 3 --profile-out "$OUT/profile-7b-step3.txt"
    step 7b-trl-best $B --shape llama2-7b --steps 14 --warmup 4 --modes trl-best
    step 7b-levers $B --shape llama2-7b --steps 14 --warmup 4 --modes kubetune-scales,kubetune-keepw
    step 8b-defaults $B --shape llama3-8b --steps 14 --warmup 4 --modes kubetune
    step 8b-trl-best $B --shape llama3-8b --steps 14 --warmup 4 --modes trl-best
    ;;
  caps)  # ~8 min: TRL's fastest flags that fit each cap (docs/performance.md, second session)
    step cap24 $B --shape llama2-7b --steps 12 --warmup 4 --modes kubetune,trl-best --batch 2 \
      --memory-cap-gib 24
    step cap16 $B --shape llama2-7b --steps 12 --warmup 4 --modes kubetune,trl-best-checkpointed \
      --batch 4 --memory-cap-gib 16
    ;;
  caps-fp8)  # ~5 min on an H100: under a 24 GiB cap (the plan's 4,096-token micro-steps), FP8 per
    # call (the weight from the 4-bit codes) against the bf16 default and TRL's fastest flags
    # that fit (batch 2, no checkpointing), one command
    step cap24-fp8 $B --shape llama2-7b --steps 12 --warmup 4 \
      --modes kubetune-fp8,kubetune,trl-best --batch 2 --memory-cap-gib 24
    ;;
  h100)  # ~9.5 min on an H100, the table's rows most important first: FP8's GPU tests, the 7B
    # defaults and TRL's best, the same under a 24 GiB cap (TRL at batch 2), the pieces (every
    # tile of the 4-bit kernel checked byte for byte), the 8B defaults and TRL's best
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_fp8_base.py \
      tests/trainer/test_fused_lora.py tests/trainer/test_trainer_gpu.py -p no:cacheprovider -rs
    for mode in kubetune trl-best; do
      step "7b-$mode" bash bench/gpu.sh python3 bench/qlora_throughput.py \
        --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 --shape llama2-7b \
        --modes "$mode"
    done
    step cap24 $B --shape llama2-7b --steps 12 --warmup 4 --modes kubetune,trl-best --batch 2 \
      --memory-cap-gib 24
    step fp8-matmul bash bench/gpu.sh python3 bench/fp8_matmul.py --out "$OUT/fp8-matmul.jsonl" \
      --iters 10
    for mode in kubetune trl-best; do
      step "8b-$mode" bash bench/gpu.sh python3 bench/qlora_throughput.py \
        --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 --shape llama3-8b \
        --modes "$mode"
    done
    ;;
  tests)  # ~2 min
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer -p no:cacheprovider
    ;;
  fp8)  # ~7 min on an H100: the GPU tests first (FP8's among them, ~1 min), the pieces, 7B
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer -p no:cacheprovider -rs
    step fp8-matmul bash bench/gpu.sh python3 bench/fp8_matmul.py --out "$OUT/fp8-matmul.jsonl"
    step 7b-fp8 bash bench/gpu.sh python3 bench/qlora_throughput.py --out "$OUT/results.jsonl" \
      --logging-steps 10 --shape llama2-7b --steps 14 --warmup 4 \
      --modes kubetune-bf16,kubetune-fp8,trl-best
    ;;
  codes)  # ~7 min on an H100: FP8's GPU tests, 7B FP8 per call (the weight from the 4-bit codes
    # in one kernel) against the two steps (dequantise, quantise, transpose) and TRL's best, then
    # the pieces (the kernel's tiles swept)
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_fp8_base.py \
      tests/trainer/test_fused_lora.py tests/trainer/test_trainer_gpu.py -p no:cacheprovider -rs
    # (the default's step 3 profiled: where an FP8 step's time goes)
    step 7b-kubetune-fp8 bash bench/gpu.sh python3 bench/qlora_throughput.py \
      --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 --shape llama2-7b \
      --modes kubetune-fp8 --profile-step 3 --profile-out "$OUT/profile-7b-fp8-step3.txt"
    for mode in kubetune-fp8-twostep trl-best; do
      step "7b-$mode" bash bench/gpu.sh python3 bench/qlora_throughput.py \
        --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 --shape llama2-7b \
        --modes "$mode"
    done
    step fp8-matmul bash bench/gpu.sh python3 bench/fp8_matmul.py --out "$OUT/fp8-matmul.jsonl" \
      --iters 10
    ;;
  fp8-h200)  # ~9 min on an H200: FP8's GPU tests, then the 7B and 8B defaults (the plan keeps
    # the e4m3 base there) each beside TRL's best, then 7B with FP8 per call; all at
    # --logging-steps 10, most important first (a command cut at its limit keeps those)
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_fp8_base.py \
      tests/trainer/test_fused_lora.py tests/trainer/test_trainer_gpu.py -p no:cacheprovider -rs
    for run in llama2-7b:kubetune llama2-7b:trl-best llama3-8b:kubetune llama3-8b:trl-best \
      llama2-7b:kubetune-fp8-percall; do
      step "${run/:/-}" bash bench/gpu.sh python3 bench/qlora_throughput.py \
        --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 \
        --shape "${run%%:*}" --modes "${run#*:}"
    done
    ;;
  grouped)  # ~9.5 min: the GPU tests of FP8 and the fused and grouped layers, then the 7B
    # defaults with q, k, v and gate, up as one function beside every layer alone and TRL's
    # best, then the 8B the same way; most important first
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_fp8_base.py \
      tests/trainer/test_fused_lora.py tests/trainer/test_grouped_lora.py \
      tests/trainer/test_trainer_gpu.py -p no:cacheprovider -rs
    for run in llama2-7b:kubetune-grouped llama2-7b:kubetune-ungrouped llama2-7b:trl-best \
      llama3-8b:kubetune-grouped llama3-8b:trl-best llama3-8b:kubetune-ungrouped; do
      step "${run/:/-}" bash bench/gpu.sh python3 bench/qlora_throughput.py \
        --out "$OUT/results.jsonl" --logging-steps 10 --steps 14 --warmup 4 \
        --shape "${run%%:*}" --modes "${run#*:}"
    done
    ;;
  grouped-7b)  # ~4 min: the 7B defaults with q, k, v and gate, up as one function vs every layer
    # alone, one model built for both, then the grouped layers' GPU tests
    step 7b-grouped-vs-ungrouped bash bench/gpu.sh python3 bench/qlora_throughput.py \
      --out "$OUT/results.jsonl" --logging-steps 2 --steps 12 --warmup 4 \
      --shape llama2-7b --modes kubetune-grouped,kubetune-ungrouped
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_grouped_lora.py \
      tests/trainer/test_fp8_base.py -p no:cacheprovider -rs
    ;;
  h200)  # ~7 min on an H200, issue 31's H200 rows on today's defaults (FP8 base, siblings
    # grouped), most important first: the 7B and 8B defaults each beside TRL's best, then the
    # GPU tests (the trainer end to end among them), then the 24 GiB cap (TRL at batch 2)
    for run in llama2-7b:kubetune llama2-7b:trl-best llama3-8b:kubetune llama3-8b:trl-best; do
      step "${run/:/-}" $B --steps 12 --warmup 4 --shape "${run%%:*}" --modes "${run#*:}"
    done
    KUBETUNE_CACHE_DIR=/tmp/kc-tests TRITON_CACHE_DIR=/tmp/kc-tests/triton step gpu-tests \
      bash bench/gpu.sh python3 -m pytest -q -m gpu tests/trainer/test_fp8_base.py \
      tests/trainer/test_fused_lora.py tests/trainer/test_grouped_lora.py \
      tests/trainer/test_trainer_gpu.py -p no:cacheprovider -rs
    step cap24 $B --shape llama2-7b --steps 12 --warmup 4 --modes kubetune,trl-best --batch 2 \
      --memory-cap-gib 24
    ;;
  fp8-parity)  # ~4 min: each kubetune parity mode against plain TRL, 20 steps, a loss a step
    step 7b-fp8-parity bash bench/gpu.sh python3 bench/qlora_throughput.py \
      --out "$OUT/results.jsonl" --shape llama2-7b --steps 20 --warmup 4 --logging-steps 1 \
      --token-range 512 --batch 4 --modes kubetune-fp8-parity,kubetune-parity,trl-parity
    ;;
  *)
    echo "usage: OUT=DIR bash bench/gpu_round.sh speed|caps|caps-fp8|h100|tests|fp8|codes|fp8-h200|grouped|grouped-7b|h200|fp8-parity" >&2
    exit 2
    ;;
esac
