#!/usr/bin/env bash
# Python reference environment for the parity, round-trip and format tests (experiments/tests/parity.rs,
# roundtrip.rs, scripts/parity_fixture.py, scripts/roundtrip_check.py): torch + transformers +
# safetensors + tokenizers in a venv at ${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}.
#
# Idempotent: when the venv exists, its stamp matches this script's package list and the imports
# work, it returns in about a second.
#
# Why torch is installed by hand: on Linux x86-64, PyPI only has the CUDA build of torch, and a plain
# `pip install torch` pulls ~25 packages (CUDA toolkit, cusolver, triton, ...). We only run it on the
# CPU, but `import torch` still dlopens libtorch_cuda.so, whose DT_NEEDED libraries must exist. So:
# torch with --no-deps, exactly the nvidia-* wheels those libraries link against (found with
# `readelf -d torch/lib/libtorch_cuda.so`), and torch's small pure-Python dependencies. Skipped:
# triton, cusolver (loaded lazily), cuda-toolkit/cuda-bindings, nvtx, cccl. Measured here: 2.46 GB
# of wheels (torch 540 MB, cudnn 520 MB, cublas 405 MB, cufft/nccl/cusparselt/cusparse/nvshmem
# 135-220 MB each, the rest small), 4.3 GB on disk, about 2 minutes on a fresh machine (about 100 s
# of it unpacking); later runs ~4 s (the import check). No CPU-only torch wheel exists on PyPI.
# The pins must move together: the nvidia versions are those torch==$TORCH requires.
set -euo pipefail

VENV="${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}"
PY="${ABLATE_BASE_PYTHON:-python3}"
TORCH=2.15.0
NVIDIA=(
  nvidia-cuda-runtime==13.2.86
  nvidia-cuda-nvrtc==13.2.86
  nvidia-cuda-cupti==13.2.86
  nvidia-cublas==13.4.1.3
  nvidia-cudnn-cu13==9.26.0.51
  nvidia-cufft==12.2.0.57
  nvidia-cufile==1.17.1.22
  nvidia-cusparse==12.7.10.12
  nvidia-cusparselt-cu13==0.8.1
  nvidia-nccl-cu13==2.30.7
  nvidia-nvshmem-cu13==3.7.2
  nvidia-nvjitlink==13.5.37
)
TORCH_PY_DEPS=(typing_extensions filelock sympy networkx jinja2 fsspec numpy)
HF=(transformers==5.23.0 tokenizers safetensors)
# References for the other formats and protocols ablate speaks: GGUF (gguf: its reader and
# dequantization; transformers' `gguf_file=` loader needs it and accelerate), PEFT adapters,
# TensorBoard event files (its own reader), and a gRPC client of another implementation (grpcio,
# stubs generated from proto/ablate.proto by grpcio-tools, health and reflection clients).
REFS=(gguf==0.19.0 tensorboard==2.21.0 grpcio==1.85.3 grpcio-tools==1.85.1
  grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 psutil)
# accelerate and peft require torch: installed without dependencies (their others are above or in
# REFS), or pip would resolve torch's CUDA stack again (triton, cuda-toolkit: +1.4 GB).
TORCH_USERS=(accelerate==1.15.0 peft==0.21.2)

STAMP_WANT="torch==$TORCH ${NVIDIA[*]} ${TORCH_PY_DEPS[*]} ${HF[*]} ${REFS[*]} ${TORCH_USERS[*]}"
STAMP="$VENV/.ablate-stamp"
CHECK='import torch, transformers, tokenizers, safetensors, gguf, accelerate, peft, tensorboard, grpc, grpc_tools, grpc_health, grpc_reflection; torch.ones(2) @ torch.ones(2)'

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_WANT" ] \
   && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  echo "pyenv: ready at $VENV"
  exit 0
fi

echo "pyenv: installing torch (CPU use, minimal CUDA runtime) + transformers into $VENV" >&2
start=$(date +%s)
"$PY" -m venv "$VENV"
# --no-warn-conflicts: pip would otherwise report the deliberately skipped torch dependencies.
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-warn-conflicts)
"${PIP[@]}" --no-deps "torch==$TORCH" "${NVIDIA[@]}"
"${PIP[@]}" "${TORCH_PY_DEPS[@]}"
# transformers does not depend on torch in its metadata, so this does not pull the CUDA stack.
"${PIP[@]}" "${HF[@]}"
"${PIP[@]}" "${REFS[@]}"
"${PIP[@]}" --no-deps "${TORCH_USERS[@]}"
"$VENV/bin/python" -c "$CHECK"
echo "$STAMP_WANT" > "$STAMP"
echo "pyenv: ready at $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))" >&2
