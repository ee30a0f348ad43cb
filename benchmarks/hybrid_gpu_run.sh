#!/usr/bin/env bash
# The GPU runs of hybrid and state-space models (issue 27), one stage per device call, logs under
# $OUT. Run from the repository root on the GPU machine, carrying `.hybridwheels`
# (benchmarks/stage_hybrid_wheels.sh):
#   source .hybridwheels/env.sh && benchmarks/hybrid_gpu_run.sh tests
#   source .hybridwheels/env.sh && benchmarks/hybrid_gpu_run.sh W2      # then W1
# Transformers' own continuous batching crashes on these models (huggingface/transformers#48305):
# the baseline is stock `generate` (transformers-static), in the same run.
set -uo pipefail
out=${OUT:-/tmp/hybrid_out}
mkdir -p "$out"
python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())' \
    | tee "$out/versions.txt"
python3 -c 'import fla; print("fla", fla.__version__)' >> "$out/versions.txt" 2>&1
case "${1:-tests}" in
  tests)
    python3 -m pytest -q -s -m cuda tests/test_cuda_state.py 2>&1 | tee "$out/pytest_cuda_state.txt" | tail -30
    python3 -m pytest -q -x tests/test_state_models.py 2>&1 | tail -5 | tee "$out/pytest_state_cpu_suite.txt" ;;
  W1|W2)
    for model in qwen3.5-9b qwen3-next-16l; do
      python3 benchmarks/throughput.py --model "$model" --workload "$1" --skip transformers-cb --no-progress \
          --json "$out/${model}_$1.json" 2>&1 | tail -25 | tee "$out/${model}_$1.txt"
    done ;;
  *) echo "unknown stage $1 (tests, W1, W2)"; exit 2 ;;
esac
