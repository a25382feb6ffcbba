#!/usr/bin/env bash
# A build-only CUDA 13.0 toolchain from PyPI wheels, for machines without a GPU or the
# NVIDIA package repositories (CI, the build machine of scripts/gpu-check.sh).
#
#   scripts/cuda-toolchain.sh PREFIX          nvcc, headers, runtime: enough for
#                                             `cargo check --features cuda` (every .cu file
#                                             compiled to PTX, all Rust type-checked)
#   LINK=1 scripts/cuda-toolchain.sh PREFIX   also cuBLAS, cuRAND and a link-time stand-in
#                                             for the driver library (libcuda.so.1, which
#                                             only the NVIDIA driver ships), so
#                                             `cargo build --features cuda` links
#   NCCL=1 ...                                also NCCL (`--features cuda,nccl`; with LINK=1,
#                                             it links)
#
# Then `source PREFIX/cuda-env.sh`. Everything is pinned to CUDA 13.0: GPU machines on
# driver 580 cannot load PTX from a newer nvcc. Idempotent: a second run reuses PREFIX.
set -euo pipefail
PREFIX=${1:?usage: cuda-toolchain.sh PREFIX}
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
if [ ! -x "$PREFIX/venv/bin/pip" ]; then python3 -m venv "$PREFIX/venv"; fi
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88)
if [ -n "${LINK:-}" ]; then wheels+=(nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35); fi
if [ -n "${NCCL:-}" ]; then wheels+=(nvidia-nccl-cu13==2.32.3); fi
"$PREFIX/venv/bin/pip" install --quiet --disable-pip-version-check "${wheels[@]}"
site=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cu="$site/nvidia/cu13"
# nvcc's profile looks for libraries in $TOP/lib64.
ln -sfn lib "$cu/lib64"
# The unversioned names the linker wants.
( cd "$cu/lib"
  for l in cudart nvrtc cublas cublasLt; do [ -e "lib$l.so.13" ] && ln -sf "lib$l.so.13" "lib$l.so"; done
  [ -e libcurand.so.10 ] && ln -sf libcurand.so.10 libcurand.so
  true )
nccl="$site/nvidia/nccl/lib"
if [ -e "$nccl/libnccl.so.2" ]; then ln -sf libnccl.so.2 "$nccl/libnccl.so"; fi
if [ -n "${LINK:-}" ]; then
  # A stand-in libcuda.so with every cu* entry point cuda.h declares (and the versioned
  # names its #defines map to): enough to link, never loaded on a machine with a driver.
  mkdir -p "$cu/lib/stubs"
  { grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$cu/include/cuda.h" | tr -d ' ('
    grep -oE '#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | awk '{print $3}'
  } | sort -u | awk '{print "int " $1 "(void) { return 999; }"}' > "$cu/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$cu/lib/stubs/libcuda.c"
  ln -sf stubs/libcuda.so "$cu/lib/libcuda.so"
fi
cat > "$PREFIX/cuda-env.sh" <<EOT
export CUDA_HOME=$cu
export CUDA_PATH=$cu
export NVCC=$cu/bin/nvcc
export PATH=$cu/bin:\$PATH
export LIBRARY_PATH=$cu/lib:$nccl\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
EOT
echo "CUDA toolchain ready: source $PREFIX/cuda-env.sh" >&2
