#!/usr/bin/env bash
# The runs behind docs/results.md's format, length, words and language sections, on the SHIPPED vectors (run `make vectors`
# first; nothing here computes a vector). Bounded for a 2-core CPU; reports go to runs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 COLUMNS=200
PY=.venv/bin/python
NSTEER=.venv/bin/nsteer
step() { echo "== $* ($(date -u +%T))"; }
step "format 2x2, the setting chosen on validation (late prompt-only add, centered), without and with the gate"
$NSTEER eval scripts/results/format-late.yaml --out runs/results/format-late
$NSTEER eval scripts/results/format-late-gate.yaml --out runs/results/format-late-gate
step "format 2x2 at 256 new tokens (4 prompts per instruction)"
$NSTEER eval scripts/results/format-late-256.yaml --limit 4 --out runs/results/format-late-256
step "format 2x2, the shipped vectors at their searched settings"
$NSTEER eval scripts/results/format-eval.yaml --out runs/results/format-searched
step "the same at 256 new tokens"
$NSTEER eval scripts/results/format-eval-256.yaml --out runs/results/format-searched-256-full
step "length 2x2, the shipped vectors at their searched settings"
$NSTEER eval scripts/results/length-eval.yaml --out runs/results/length-eval
step "clamped add against plain add of the same mean strength (validation)"
$PY scripts/clamp_vs_add.py --layer 16 --k 2 --clamps 0,1 --prompts 16 --max-new-tokens 256 --out runs/results/clamp-vs-add
step "accuracy against the number of training pairs (validation)"
$PY scripts/pair_count.py --work runs/results/pair-count
step "length curve"
$PY scripts/length_curve.py --out runs/results/length-curve
step "verbosity curve (384 tokens)"
$PY scripts/length_curve.py --weights=-90,-60,-30,0 --max-new-tokens 384 --threads 2 --out runs/results/verbosity-curve --png docs/img/verbosity-curve.png
step "word inclusion"
$NSTEER eval scripts/results/words-inclusion.yaml --out runs/results/words-inclusion
step "word exclusion"
$NSTEER eval scripts/results/words-exclusion.yaml --data scripts/results/word-exclusion.jsonl --limit 2 --out runs/results/words-exclusion
step "language"
$NSTEER eval scripts/results/language-eval.yaml --out runs/results/language
step "done"
