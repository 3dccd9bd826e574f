#!/usr/bin/env bash
# The whole GPU check in one command (< 8 minutes on one H200); every step timed, results in one Markdown file.
#
#   bash bench/gpu_check.sh              # on the GPU machine; results: bench/results/gpu-<date>.md (also printed)
#   bash bench/gpu_check.sh --dry-run    # every step at toy size on the CPU (the tests run this)
#
# The GPU machine has torch, lightning, torchmetrics, numpy, pillow, scikit-learn but not hydra-core, omegaconf,
# faiss or wandb, and no network: put their wheels in bench/wheels/ (or IRLAB_WHEELS=/dir; download them
# beforehand with `pip download --only-binary=:all: --python-version 3.12 -d bench/wheels hydra-core omegaconf
# antlr4-python3-runtime==4.9.3 faiss-cpu`, < 64 MiB). They are installed into a temporary target that goes
# first on PYTHONPATH, so the machine's own torch stays the one in use. A step that fails is recorded with its
# exit code and the tail of its output; the script goes on to the next step and exits non-zero at the end.
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
cd "$(dirname "$0")/.."
STAMP=$(date -u +%Y-%m-%d-%H%M)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [[ $DRY == 1 ]]; then
  OUT=${IRLAB_GPU_RESULTS:-$WORK/gpu-dry-run.md}
else
  OUT=${IRLAB_GPU_RESULTS:-bench/results/gpu-$STAMP.md}
fi
mkdir -p "$(dirname "$OUT")"
PY=${PYTHON:-python}
if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; fi  # the project's own environment where one exists

WHEELS=${IRLAB_WHEELS:-bench/wheels}
missing=$($PY - <<'EOF'
import importlib.util
print(" ".join(m for m in ("hydra", "omegaconf", "faiss") if importlib.util.find_spec(m) is None))
EOF
)
if [[ -n "$missing" ]]; then
  if [[ -d "$WHEELS" ]]; then
    $PY -m pip install -q --no-index --find-links "$WHEELS" --target "$WORK/site" hydra-core omegaconf faiss-cpu \
      >"$WORK/pip.log" 2>&1 || echo "wheel install failed: $(tail -3 "$WORK/pip.log")"
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "missing modules: $missing, and no wheel folder $WHEELS (see the header of this script)"
  fi
fi
export WANDB_MODE=offline HYDRA_FULL_ERROR=1 IRLAB_LOG_DIR="$WORK/logs"

if [[ $DRY == 1 ]]; then
  GPU_TRAINER=trainer=cpu; DDP_TRAINER="trainer=ddp_cpu trainer.devices=1"; DEVICE=cpu; BF16=""
  TOY="--toy --steps 2 --rounds 1"
  AREIR_SIZE="--members 2 --meta-classes 4 --size 32 --batch 2 --rounds 1 --iters 1"
  BEAM_SIZE="--sizes 1000 4000 --width 32 --layers 1 --heads 2 --beam 4 --queries 2 --memory-tokens 5 --dim 16 --repeats 1"
  REHEARSAL="--scale 0.003"
else
  GPU_TRAINER=trainer=gpu; DDP_TRAINER="trainer=ddp trainer.devices=1"; DEVICE=cuda; BF16="--bf16"; TOY=""
  AREIR_SIZE="--members 48 --meta-classes 12 --size 256 --batch 12 --rounds 3 --iters 2"
  BEAM_SIZE="--sizes 10000 1000000 --width 768 --layers 12 --heads 12 --beam 30 --queries 32 --threads 0"
  REHEARSAL="--scale 0.1 --gpu"
fi
FAST="debug=fast hydra.run.dir=$WORK/run"
FAILED=0

{
  echo "# GPU check, $STAMP$([[ $DRY == 1 ]] && echo ' (dry run: toy sizes on CPU)')"
  echo
  echo "Host: $(hostname), $(nproc) CPU cores, load average $(cut -d' ' -f1-3 /proc/loadavg)."
} >"$OUT"

step() {  # step "<title>" command...: run, time, record exit code and output tail
  local title=$1; shift
  local log="$WORK/step.log" start end rc seconds
  start=$(date +%s%N)
  "$@" >"$log" 2>&1
  rc=$?
  end=$(date +%s%N)
  seconds=$(( (end - start) / 1000000 ))
  seconds="$((seconds / 1000)).$(printf '%03d' $((seconds % 1000)))"
  [[ $rc == 0 ]] || FAILED=1
  {
    echo
    echo "## $title"
    echo
    printf -- '- command: `%s`\n- exit code %s, %s s\n\n' "$*" "$rc" "$seconds"
    echo '```'
    grep -v '^\s*$' "$log" | tail -n 25
    echo '```'
  } >>"$OUT"
  echo "[$rc] $title ($seconds s)"
}

step "environment" $PY -c "import torch, lightning, sys; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'lightning', lightning.__version__); print('GPU:', torch.cuda.get_device_name() \
if torch.cuda.is_available() else 'none')"
step "GPU-marked tests" $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts=-ra tests  # no xdist there
step "DDP, one process ($DDP_TRAINER), baseline debug=fast" $PY train.py $DDP_TRAINER $FAST
step "baseline, $GPU_TRAINER, debug=fast" $PY train.py $GPU_TRAINER $FAST
step "AREIR, $GPU_TRAINER, debug=fast" $PY train.py experiment=digits_areir $GPU_TRAINER $FAST
step "IRGen pipeline, $GPU_TRAINER, debug=fast" $PY train.py experiment=digits_irgen $GPU_TRAINER $FAST
step "AREIR members: loop vs grouped" $PY bench/areir_members.py $AREIR_SIZE --device $DEVICE $BF16 --impls loop,grouped
step "AREIR members, activation checkpointing" $PY bench/areir_members.py $AREIR_SIZE --device $DEVICE $BF16 \
  --impls loop,grouped --checkpoint
step "IRGen generator training step" $PY bench/gpu_throughput.py --model irgen_generator --device $DEVICE $BF16 $TOY
step "IRGen generator training step, torch.compile" $PY bench/gpu_throughput.py --model irgen_generator \
  --device $DEVICE $BF16 $TOY --compile
step "baseline ResNet-50 training step" $PY bench/gpu_throughput.py --model baseline --device $DEVICE $BF16 $TOY
step "beam search vs exact kNN, per-query time" $PY bench/beam_search_scaling.py $BEAM_SIZE
step "faiss on the GPU (StandardGpuResources, exact search equal to the CPU) and the torch fallback" \
  $PY bench/faiss_gpu_check.py --device $DEVICE
step "isc_irgen stages at reduced size (fake In-shop x0.1, CLIP ViT-B/16 224 px): time, memory, GPU utilisation" \
  $PY bench/full_scale_rehearsal.py --jobs isc_irgen $REHEARSAL --cache "$WORK/rehearsal" \
  --out "$WORK/rehearsal_out" --results "$WORK/rehearsal_results"

echo "results: $OUT"
if [[ $DRY == 1 ]]; then cat "$OUT"; fi
exit $FAILED
