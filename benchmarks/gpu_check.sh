#!/usr/bin/env bash
# The checks a session with a GPU runs first (about 5-8 minutes on an H100/H200 after the installs), in one go:
#   1. the Triton kernels compiled on the GPU against the PyTorch paths (tests/test_triton_kernels.py runs every
#      test on CUDA too, bf16 included), and the dispatch's own tests on the GPU;
#   2. the dispatch and stick-breaking attention with the Triton kernels, without them (`ours_without_triton`,
#      "PyTorch" forms) and against the dense matmul, SDPA and transformers' grouped_mm, in fp32 and bf16.
# Results (Markdown and JSON) go to $OUT (default benchmarks/results/gpu). Usage, from the repository root:
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
python=".venv/bin/python"
[ -x "$python" ] || python=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"

"$python" -m pytest tests/test_triton_kernels.py -q -x -rs 2>&1 | tee "$out/test_triton_kernels.txt"
for dtype in fp32 bf16; do
    "$python" -m benchmarks.bench_dispatch --device cuda --dtype "$dtype" --tokens 16384 --repeats 10 \
        --cases moeut-244m-ffn molm-ffn moeut-244m-switchhead-vo decode \
        --json "$out/dispatch-$dtype.json" --markdown "$out/dispatch-$dtype.md"
    "$python" -m benchmarks.bench_attention --device cuda --dtype "$dtype" --batch 8 --repeats 10 \
        --seqs 512 1024 2048 --naive-max-seq 1024 \
        --json "$out/attention-$dtype.json" --markdown "$out/attention-$dtype.md"
done
