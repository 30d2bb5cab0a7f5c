#!/usr/bin/env bash
# Full benchmark suite on the default accelerator, capped to fit about 7 minutes in all.
# Usage (from the repository root): bash bench/gpu.sh [RESULTS_DIR] [extra bench/run.py args...]
# Installs nothing: jax, optax, and optionally torch, flax and equinox must already be importable;
# jaxnet is imported from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
shift || true
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
"$PY" -c 'import jax; print("devices:", jax.devices())'
# --time-limit stops starting new cases after 330 s; the outer timeout is the hard cap.
timeout 420 "$PY" bench/run.py --suite full --out "$OUT" --json "$OUT/latest.json" --time-limit 330 "$@" \
  2>&1 | tee "$OUT/run.log"
# The convolutional and transformer cases (bench/cnn.py), capped separately.
timeout 150 "$PY" bench/cnn.py --repeats 3 --json "$OUT/cnn.json" 2>&1 | tee "$OUT/cnn.log"
# Streaming from host memory against resident data (bench/stream.py), capped separately.
timeout 120 "$PY" bench/stream.py --repeats 3 --json "$OUT/stream.json" 2>&1 | tee "$OUT/stream.log"
# A GPT-2-small-like language model (12 layers, width 768, context 256): jaxnet against hand-written JAX,
# tokens/s and MFU against the H100's dense bf16 peak (989 TFLOP/s; float32 here, so MFU is low by design).
timeout 150 "$PY" bench/lm.py --layers 12 --heads 12 --dim 768 --context 256 --batch 16 --rounds 4 --steps 20 \
  --no-torch --peak-tflops 989 --json "$OUT/lm.json" 2>&1 | tee "$OUT/lm.log"
