#!/usr/bin/env bash
# Build the CUDA worker (`ablate-worker` with the `cuda` feature) on a machine without a GPU or a
# system CUDA install, from NVIDIA's CUDA toolkit wheels (pip, by package name).
#
#   scripts/build-cuda.sh            # release build -> target/cuda/release/ablate-worker
#   scripts/build-cuda.sh --check    # only `cargo check` the cuda feature (still runs nvcc)
#   scripts/build-cuda.sh --clippy   # `cargo clippy --all-targets -D warnings` of worker and
#                                    # experiments with the feature: the workspace lints (SAFETY
#                                    # comments, ...) cover the GPU code too
#
# Settings (environment):
#   CUDA_COMPUTE_CAP   GPU architecture to compile the kernels for: 90 = H100/H200 (default),
#                      80 = A100, 89 = L4/L40/RTX 4090, 86 = A10/RTX 3090, 75 = T4.
#   ABLATE_CUDA_DIR    where the toolkit wheels are unpacked (default target/cuda-toolkit-13.0).
#   CARGO_TARGET_DIR   default target/cuda, so the CPU build in target/ is not overwritten.
#   ABLATE_FEATURES    `cuda` (default) or `nccl`: also average the gradients of multi-rank
#                      (gang) trials on the GPUs with NCCL; adds the NCCL wheel, and the binary
#                      then needs libnccl.so.2 at run time as well.
#   ABLATE_GLIBC       e.g. 2.28: link against that glibc (cargo zigbuild, as
#                      scripts/build-release.sh), so the worker starts on RHEL 8 (2.28) and
#                      Ubuntu 20.04 (2.31); checked with scripts/check-glibc.sh. Default: this
#                      machine's glibc (Debian 12: the binary needs 2.34).
#
# The toolkit is pinned to CUDA 13.0 on purpose: PTX from a newer toolkit does not load on a
# driver that only supports 13.0 (driver 580; `nvidia-smi` prints "CUDA Version"). For a newer
# driver, move all the pins below together to one CUDA release. The cu12 nvcc wheel has no nvcc
# driver program, so CUDA 12 cannot be built this way.
#
# Traps handled here: the wheels ship only versioned libraries (libcublas.so.13), so the
# unversioned names the linker wants are symlinked; and libcuda comes with the driver, not the
# toolkit, so a stub libcuda.so (soname libcuda.so.1) is built to link against. The stub never
# ships: at run time the binary loads the driver's libcuda.so.1 and needs cuBLAS, cuRAND and the
# CUDA runtime 13 (deploy/docker/Dockerfile.cuda uses NVIDIA's runtime image; a host can use the
# same wheels with LD_LIBRARY_PATH). A CUDA binary does not start without them, even for CPU
# work, which is why the CPU worker is a separate, default build that needs no CUDA library.
#
# Measured on a 2-core machine: about 10.5 minutes for a release build, 8 of them in nvcc; the
# wheels are about 0.6 GB to download.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=build
case "${1:-}" in
  --check) mode=check ;;
  --clippy) mode=clippy ;;
  "") ;;
  -h | --help)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 0
    ;;
  *)
    echo "build-cuda.sh: unknown argument $1 (use --check, --clippy or nothing)" >&2
    exit 2
    ;;
esac

PY="${ABLATE_BASE_PYTHON:-python3}"
FEATURES="${ABLATE_FEATURES:-cuda}"
case "$FEATURES" in
  cuda | nccl) ;;
  *)
    echo "build-cuda.sh: ABLATE_FEATURES=$FEATURES: expected cuda or nccl" >&2
    exit 2
    ;;
esac
DIR="${ABLATE_CUDA_DIR:-$PWD/target/cuda-toolkit-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
# CUDA 13.0 (update 2) toolkit pieces candle's cuda feature needs: nvcc and its back end (nvvm,
# crt headers), the runtime, NVRTC, CCCL headers, cuBLAS and cuRAND.
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
if [ "$FEATURES" = nccl ]; then
  WHEELS+=(nvidia-nccl-cu13==2.30.7)
fi

stamp="$DIR/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${WHEELS[*]}" ]; then
  echo "build-cuda: installing the CUDA 13.0 toolkit wheels into $DIR"
  rm -rf "$DIR"
  mkdir -p "$DIR"
  # --target installs into a plain folder, never into the system's Python.
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-deps --no-input \
    --disable-pip-version-check --root-user-action=ignore --quiet --target "$DIR" "${WHEELS[@]}"
  echo "${WHEELS[*]}" >"$stamp"
fi

CU="$DIR/nvidia/cu13"
for need in bin/nvcc nvvm include/cuda.h include/cuda_runtime.h; do
  if [ ! -e "$CU/$need" ]; then
    echo "build-cuda: $CU/$need is missing: the wheel layout changed? (remove $DIR to reinstall)" >&2
    exit 1
  fi
done
chmod +x "$CU/bin/"* "$CU"/nvvm/bin/* 2>/dev/null || true

# Unversioned names for the linker (libX.so -> libX.so.N).
for lib in cudart cublas cublasLt curand nvrtc; do
  if [ ! -e "$CU/lib/lib$lib.so" ]; then
    versioned=$(find "$CU/lib" -maxdepth 1 -name "lib$lib.so.*" -printf '%f\n' | sort | head -n 1)
    if [ -z "$versioned" ]; then
      echo "build-cuda: no lib$lib.so.* in $CU/lib" >&2
      exit 1
    fi
    ln -s "$versioned" "$CU/lib/lib$lib.so"
  fi
done

# NCCL's wheel has its own folder (nvidia/nccl/lib) and, like the others, only libnccl.so.2.
NCCL_LIB="$DIR/nvidia/nccl/lib"
if [ "$FEATURES" = nccl ]; then
  [ -e "$NCCL_LIB/libnccl.so.2" ] || { echo "build-cuda: no libnccl.so.2 in $NCCL_LIB" >&2; exit 1; }
  [ -e "$NCCL_LIB/libnccl.so" ] || ln -s libnccl.so.2 "$NCCL_LIB/libnccl.so"
fi

# The stub driver library, link time only. candle links cudarc's driver bindings directly
# (cudarc's `dynamic-linking`), so the stub must define every driver function they declare:
# the names are taken from cudarc's own bindings, one empty function each.
STUB="$DIR/stubs"
mkdir -p "$STUB"
cargo fetch --quiet
cudarc_src=$(cargo metadata --format-version 1 --quiet --features worker/cuda |
  "$PY" -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc").rsplit("/", 1)[0])')
bindings="$cudarc_src/src/driver/sys/mod.rs"
[ -f "$bindings" ] || { echo "build-cuda: cudarc's driver bindings not found at $bindings" >&2; exit 1; }
grep -oE '^[[:space:]]+fn cu[A-Za-z0-9_]+\(' "$bindings" | sed -E 's/^[[:space:]]+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' |
  sort -u >"$STUB/stub.c.new"
count=$(wc -l <"$STUB/stub.c.new")
[ "$count" -gt 100 ] || { echo "build-cuda: only $count driver functions found in $bindings" >&2; exit 1; }
if ! cmp -s "$STUB/stub.c.new" "$STUB/stub.c" || [ ! -e "$STUB/libcuda.so" ]; then
  mv "$STUB/stub.c.new" "$STUB/stub.c"
  "${CC:-cc}" -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"
  echo "build-cuda: stub libcuda.so with $count driver functions (link time only)"
fi
rm -f "$STUB/stub.c.new"

export CUDA_HOME="$CU" CUDA_ROOT="$CU" CUDA_PATH="$CU"
export NVCC="$CU/bin/nvcc"
export PATH="$CU/bin:$PATH"
export LIBRARY_PATH="$CU/lib:$NCCL_LIB:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}"
# Build scripts that run CUDA tools need the toolkit's libraries (never the stub).
export LD_LIBRARY_PATH="$CU/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$CU/lib -L native=$NCCL_LIB -L native=$STUB"

echo "build-cuda: nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute capability $CUDA_COMPUTE_CAP, target dir $CARGO_TARGET_DIR"
if [ "$mode" = check ]; then
  cargo check -p worker --features "$FEATURES" --bins
  echo "build-cuda: the $FEATURES feature compiles"
  exit 0
fi
if [ "$mode" = clippy ]; then
  cargo clippy -p worker -p experiments --features "worker/$FEATURES" --all-targets -- -D warnings
  echo "build-cuda: clippy is clean with the $FEATURES feature"
  exit 0
fi
bin="$CARGO_TARGET_DIR/release/ablate-worker"
if [ -n "${ABLATE_GLIBC:-}" ]; then
  # shellcheck source=scripts/zigbuild-env.sh
  . scripts/zigbuild-env.sh
  triple=x86_64-unknown-linux-gnu
  cargo zigbuild --release -p worker --features "$FEATURES" --bins --target "$triple.$ABLATE_GLIBC"
  mkdir -p "$CARGO_TARGET_DIR/release"
  cp "$CARGO_TARGET_DIR/$triple/release/ablate-worker" "$bin"
  bash scripts/check-glibc.sh --max "$ABLATE_GLIBC" "$bin"
else
  cargo build --release -p worker --features "$FEATURES" --bins
fi
echo "build-cuda: built $bin"
if command -v readelf >/dev/null 2>&1; then
  echo "build-cuda: libraries it needs at run time:"
  readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/  \1/p'
fi
echo "build-cuda: on the GPU host run it with the driver's libcuda.so.1 plus cuBLAS/cuRAND/cudart 13"
echo "            (for example LD_LIBRARY_PATH=$CU/lib after installing the same wheels there)."
