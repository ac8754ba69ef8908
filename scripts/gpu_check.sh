#!/usr/bin/env bash
# The prepared check of the research setting on one GPU: bf16, CUDA and gemma-3-4b-it's architecture
# (random weights) at the gemma preset's sizes; see scripts/gpu_check.py for the steps. Writes
# $OUT/gpu_check.json (out/gpu_check/ when OUT is unset). ~5 minutes on one H100 before the compiled decode
# loop (its compiles now run in the round, and the decode step is new): not re-measured, so split it into
# device calls of under 10 minutes, the decode figures first:
#   bash scripts/gpu_check.sh --skip tests round bench     (plan + the decode bench: eager vs compiled)
#   bash scripts/gpu_check.sh --skip bench decode          (device tests + one round with compiled decoding)
#
# It runs under the machine's own python3 (its torch, transformers, peft, ...) with src/ on the path. The
# pure-Python packages such a machine lacks (tyro, loguru and theirs) and SmolLM2's tokenizer files come
# from .gpu/, which `just gpu-wheels` builds here (about 4.7 MiB) and the device call carries.
#   here:   just gpu-check --device cpu --shrink      (the dry run: the same steps at tiny sizes)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ! "$PY" -c "import tyro, loguru" 2>/dev/null && compgen -G ".gpu/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/steer_heal_site .gpu/wheels/*.whl || echo "gpu_check: installing .gpu/wheels failed" >&2
    export PYTHONPATH=/tmp/steer_heal_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-}
if [ -d .gpu/tokenizer ]; then export STEER_HEAL_TOKENIZER=${STEER_HEAL_TOKENIZER:-$PWD/.gpu/tokenizer}; fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --out "$OUT" "$@"
