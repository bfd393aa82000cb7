#!/usr/bin/env bash
# Build ONNX Runtime from source for Jetson Orin (JetPack 6, aarch64) with the on-device training API
# and the CUDA + TensorRT execution providers, into a Python wheel (no aarch64 wheel of
# onnxruntime-training exists). Used by deploy/jetson/Dockerfile; runs on a board directly as well.
#
#   build_ort.sh [--plan] [--src DIR] [--out DIR] [--requirements FILE]
#
#   --plan          print the build parallelism it would use (and why) and the build command; build nothing
#   --src DIR       ONNX Runtime checkout (cloned at v$ORT_VERSION with submodules when absent; default /src/onnxruntime)
#   --out DIR       where the wheel is copied (default /wheels)
#   --requirements  pip requirements installed before the build (numpy the wheel is built against)
#
# Parallelism follows the memory, not only the cores: one compile job of ORT's CUDA kernels takes
# 2-3 GB, and on a Jetson the GPU and the CPU share the same memory, so `--parallel $(nproc)` on an
# 8 GB Orin Nano runs out of memory. jobs = min(nproc, available / ORT_GB_PER_JOB), at least 1;
# nvcc threads per job = what is left per job / ORT_GB_PER_JOB, between 1 and 4.
#
# Environment: ORT_VERSION (1.19.2), ORT_GB_PER_JOB (3), ORT_PARALLEL / ORT_NVCC_THREADS (override the
# plan), CUDA_HOME (/usr/local/cuda), CUDNN_HOME and TENSORRT_HOME (/usr/lib/aarch64-linux-gnu: where
# JetPack puts them), ORT_CUDA_ARCHS (87: Orin), ORT_FLASH_ATTENTION (OFF: see below),
# ORT_MEM_AVAILABLE_KB / ORT_NPROC (pretend figures, for --plan).
set -euo pipefail

ORT_VERSION="${ORT_VERSION:-1.19.2}"
GB_PER_JOB="${ORT_GB_PER_JOB:-3}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
CUDNN_HOME="${CUDNN_HOME:-/usr/lib/aarch64-linux-gnu}"
TENSORRT_HOME="${TENSORRT_HOME:-/usr/lib/aarch64-linux-gnu}"
CUDA_ARCHS="${ORT_CUDA_ARCHS:-87}"
FLASH="${ORT_FLASH_ATTENTION:-OFF}"
SRC=/src/onnxruntime
OUT=/wheels
REQS=""
PLAN_ONLY=0

while [ $# -gt 0 ]; do
  case "$1" in
    --plan) PLAN_ONLY=1 ;;
    --src) SRC="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --requirements) REQS="$2"; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build_ort.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

case "$GB_PER_JOB" in ''|*[!0-9]*|0) echo "build_ort.sh: ORT_GB_PER_JOB must be a positive integer, got '$GB_PER_JOB'" >&2; exit 2 ;; esac

# Memory available to this build in MiB: MemAvailable, or the cgroup limit (docker build --memory) if lower.
available_mib() {
  local kb mib limit
  kb="${ORT_MEM_AVAILABLE_KB:-$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)}"
  mib=$((kb / 1024))
  for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do
    if [ -z "${ORT_MEM_AVAILABLE_KB:-}" ] && [ -r "$f" ]; then
      limit="$(cat "$f")"
      case "$limit" in ''|max|*[!0-9]*) ;; *) [ $((limit / 1048576)) -lt "$mib" ] && mib=$((limit / 1048576)) ;; esac
    fi
  done
  echo "$mib"
}

MEM_MIB="$(available_mib)"
CPUS="${ORT_NPROC:-$(nproc)}"
PER_JOB_MIB=$((GB_PER_JOB * 1024))
JOBS=$((MEM_MIB / PER_JOB_MIB))
[ "$JOBS" -gt "$CPUS" ] && JOBS="$CPUS"
[ "$JOBS" -lt 1 ] && JOBS=1
NVCC=$((MEM_MIB / (JOBS * PER_JOB_MIB)))
[ "$NVCC" -gt 4 ] && NVCC=4
[ "$NVCC" -lt 1 ] && NVCC=1
JOBS="${ORT_PARALLEL:-$JOBS}"
NVCC="${ORT_NVCC_THREADS:-$NVCC}"

echo "build_ort.sh: ${MEM_MIB} MiB available, ${CPUS} cores, ${GB_PER_JOB} GB per job -> parallel=${JOBS} nvcc_threads=${NVCC}"
if [ "$MEM_MIB" -lt "$PER_JOB_MIB" ]; then
  echo "build_ort.sh: warning: less than ${GB_PER_JOB} GB available: add swap (e.g. an 8 GB swap file) or stop other services" >&2
fi

# The flash / memory-efficient attention kernels serve ORT's fused Attention ops, which edgeblock's graphs
# never use (plain ONNX ops); they are the most memory-hungry CUDA sources, so they are off by default.
BUILD=(python3 tools/ci_build/build.py
  --build_dir build --config Release --update --build --build_wheel --skip_tests --skip_submodule_sync
  --allow_running_as_root --cmake_generator Ninja
  --parallel "$JOBS" --nvcc_threads "$NVCC"
  --enable_training_apis
  --use_cuda --cuda_home "$CUDA_HOME" --cudnn_home "$CUDNN_HOME"
  --use_tensorrt --tensorrt_home "$TENSORRT_HOME"
  --cmake_extra_defines "CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS}" onnxruntime_BUILD_UNIT_TESTS=OFF
  "onnxruntime_USE_FLASH_ATTENTION=${FLASH}" "onnxruntime_USE_MEMORY_EFFICIENT_ATTENTION=${FLASH}")

if [ "$PLAN_ONLY" = 1 ]; then
  echo "build_ort.sh: would run in ${SRC}: ${BUILD[*]}"
  exit 0
fi

python3 -m pip install --no-cache-dir "cmake>=3.28,<4" ninja packaging wheel setuptools
if [ -n "$REQS" ]; then
  python3 -m pip install --no-cache-dir -r "$REQS"
else
  python3 -m pip install --no-cache-dir numpy
fi
if [ ! -d "$SRC/.git" ]; then
  git clone --depth 1 --branch "v${ORT_VERSION}" --recursive --shallow-submodules \
    https://github.com/microsoft/onnxruntime.git "$SRC"
fi
export PATH="${CUDA_HOME}/bin:${PATH}" CUDACXX="${CUDA_HOME}/bin/nvcc"
cd "$SRC"
"${BUILD[@]}"
mkdir -p "$OUT"
find build/Release/dist -name '*.whl' -exec cp {} "$OUT"/ \;
ls "$OUT"/*.whl
