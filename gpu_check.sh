#!/usr/bin/env bash
# Every GPU figure in one command, on a machine with one CUDA GPU (about 9 minutes on an H200):
#
#   bash gpu_check.sh [DATA_DIR]            # DATA_DIR: the CPEN455 folder (default: data)
#   SWEEP_MINUTES=8 SWEEP_ONLY=preset bash gpu_check.sh data   # the GPU preset's record run
#
# 1. tests/test_cuda.py (the CUDA paths against the eager ones);
# 2. bench.py --device cuda (sampling, classification and training-step ratios);
# 3. gpu_sweep.py: the candidate recipes, all at once on the GPU for SWEEP_MINUTES minutes
#    (default 4), each with its log, and the table results/gpu/sweep.md.
# Each part runs in its own process under its own time limit, and the script goes on when one
# fails. Everything lands in results/gpu/ and, packed, in results/gpu.tar.gz. It needs the
# packages of requirements.txt (bidict and pytorch-fid included).
set -u
cd "$(dirname "$0")"
data=${1:-data}
minutes=${SWEEP_MINUTES:-4}
out=results/gpu
mkdir -p "$out"
rm -f "$out/parts.txt"
export PYTHONUNBUFFERED=1

part() {   # part NAME SECONDS COMMAND...: run it under its limit, its output in $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s" | tee -a "$out/parts.txt"
  tail -n 12 "$out/$name.log"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} > "$out/machine.txt" 2>&1
cat "$out/machine.txt"

part cuda_tests 180 python -m pytest -q -rs tests/test_cuda.py
part bench 240 python bench.py --device cuda --data_dir "$data"
sweep_limit=$(python -c "import sys; print(round(float(sys.argv[1]) * 60) + 180)" "$minutes")
part sweep "$sweep_limit" python gpu_sweep.py --parallel --minutes "$minutes" \
  --data_dir "$data" --out "$out" ${SWEEP_ONLY:+--only $SWEEP_ONLY}   # word-split on purpose
tar czf results/gpu.tar.gz -C results gpu
echo "results -> $out/, packed in results/gpu.tar.gz"
