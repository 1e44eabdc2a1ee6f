#!/usr/bin/env bash
# The GPU run of issue 26, prepared: the MoNuSeg 256 px grid at the paper's width 768 and 100 epochs (4 methods ×
# 3 subsets × both mask resizings; results/monuseg/256-gpu-768/protocol.json) through scripts/results.py, then
# `pytest -m gpu`, on one GPU. Evidence goes to the protocol's folder (as every results run), its timings into
# the marked block of docs/benchmarks.md.
#
# Usage: [RUNS_ROOT=DIR] [GPU_TESTS=0 (skip pytest -m gpu)] [BENCH_DOC=docs/benchmarks.md] [COMMIT=1]
#        scripts/gpu_protocol.sh [PROTOCOL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PROTO=${1:-results/monuseg/256-gpu-768}
PY=${PYTHON:-python}
DOC=${BENCH_DOC:-docs/benchmarks.md}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
machine=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)
machine=${machine:-$(uname -m) CPU, $(nproc) cores}
t0=$(date +%s)
$PY scripts/results.py "$PROTO" ${RUNS_ROOT:+--runs-root "$RUNS_ROOT"} ${COMMIT:+--commit} | tee "$PROTO/results.log"
t1=$(date +%s)
gpu_tests="not run"
if [ "${GPU_TESTS:-1}" != 0 ]; then
  $PY -m pytest -q -n 0 -m gpu 2>&1 | tee "$PROTO/pytest-gpu.log"
  gpu_tests=$(tail -1 "$PROTO/pytest-gpu.log")
fi
t2=$(date +%s)
made=$(grep -c "evidence written" "$PROTO/results.log" || true)
block="| machine | protocol | runs made | grid (s) | pytest -m gpu (s) | pytest -m gpu |
|---|---|---|---|---|---|
| $machine | $PROTO | $made | $((t1 - t0)) | $((t2 - t1)) | $gpu_tests |

(\`scripts/gpu_protocol.sh $PROTO\`, $(date -u +%Y-%m-%d); the grid's time includes the UNet and the store, skipped
where they were already there.)"
$PY - "$DOC" "$block" <<'PYEOF'
import sys
from pathlib import Path
doc, block = Path(sys.argv[1]), sys.argv[2]
begin, end = "<!-- gpu_protocol.sh -->", "<!-- /gpu_protocol.sh -->"
text = doc.read_text()
if begin not in text:
    text += f"\n## 8. The paper's protocol on one GPU (`scripts/gpu_protocol.sh`)\n\n{begin}\n{end}\n"
head, rest = text.split(begin, 1)
doc.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")
PYEOF
echo "grid $((t1 - t0)) s, pytest -m gpu $((t2 - t1)) s: timings in $DOC"
