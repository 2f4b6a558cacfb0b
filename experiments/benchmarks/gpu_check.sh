#!/usr/bin/env bash
# Every GPU figure and target of experiments/benchmarks/README.md in one run (about 6 minutes on
# one H200; give it 10): the training step (ViT-B/16 at 1000 classes, RN50 at 37), the text side
# per path at 1000 classes, peak memory, fp32 exactness on the device, the whole-run overhead of
# the quick start and of a 1000-class run, 6 runs trained as one pack against one alone (37 and
# 1000 classes, images and cached features), the few-shot grid's GPU hours, unpacked and packed,
# and each method's training cost per image against CoOp's (--methods). The last line of the
# output (and $OUT/bench.json) is the JSON line, with "targets" and "all_targets_met".
#
#   bash experiments/benchmarks/gpu_check.sh [OUT_DIR]      # default outputs/bench_gpu
#
# On a machine without the project's packages (a bare image with torch, torchvision, Lightning,
# torchmetrics, timm, safetensors, rich and scikit-learn), put these wheels (43 MB, all pure
# Python) in .whl/ first; they are installed to /tmp/site (nothing else is touched):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl open_clip_torch==3.3.0 \
#       ftfy==6.3.1 wcwidth==0.9.4 hydra-core==1.3.8 omegaconf==2.3.1 conformal-clip-data==0.1.4
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # sdist only: built here
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT_DIR=${1:-${OUT:-outputs/bench_gpu}}
mkdir -p "$OUT_DIR"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, open_clip, hydra, pytorch_lightning as pl; print('torch', torch.__version__, \
'open_clip', open_clip.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available())"

BENCH_ARGS="--device cuda --precision bf16 --backbone ViT-B-16-quickgelu --classes 1000 --extra-step RN50-quickgelu:37 --repeats 10 --warmup 3 --e2e --grid --pack 6 --methods coop,cocoop,kgcoop,prograd,maple,ivlp,promptsrc,mmrl,clip_lora,dept"
# shellcheck disable=SC2086
timeout 570 $PY experiments/benchmarks/bench.py $BENCH_ARGS --out "$OUT_DIR/bench.json" \
    2> >(tee "$OUT_DIR/bench.log" >&2)
