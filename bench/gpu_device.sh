#!/usr/bin/env bash
# Issue 10's GPU figures (bench/gpu.py) and the CUDA tests on a lent GPU machine.
#
# Here, once, in the checkout the device tool sends (downloads ~57 MB of wheels the
# device image lacks into .whl/, which .gitignore keeps out of git):
#     bash bench/gpu_device.sh wheels
# Then, through the device tool, the figures (one call, about 10 minutes):
#     run(command="bash bench/gpu_device.sh figures", carry=[".whl"], timeout_s=600)
# and, right after on the still-warm machine, the CUDA tests (2-3 minutes):
#     run(command="bash bench/gpu_device.sh tests", carry=[".whl"], timeout_s=300)
# Results land in $OUT: gpu.json (every figure, written as it is measured), gpu.log,
# test_cuda.log. Sections skipped for time are listed at the end of gpu.log; run them in
# a later call with: bash bench/gpu_device.sh figures --sections ladder ...
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pathspec==1.1.1"

install() {  # on the device: the carried wheels over the image's packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

mode=${1:-}
shift || true
out=${OUT:-runs/gpu_device}
mkdir -p "$out"
case "$mode" in
wheels)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
    ;;
figures)
    start=$(date +%s)
    install
    # 600 s per call: the install and a margin for the end out of it, the rest to the bench.
    budget=$((560 - ($(date +%s) - start)))
    timeout $((budget + 25)) python3 bench/gpu.py --out "$out" --work /tmp/bench_gpu \
        --budget-s "$budget" "$@" 2>&1 | tee "$out/gpu.log"
    ;;
tests)
    install
    timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_levers.py 2>&1 \
        | tee "$out/test_cuda.log"
    ;;
*)
    echo "usage: bash bench/gpu_device.sh wheels|figures [gpu.py options]|tests" >&2
    exit 2
    ;;
esac
