# shellcheck shell=bash
# Sourced by scripts/build-release.sh and scripts/build-cuda.sh (ABLATE_GLIBC set): puts
# `cargo zigbuild` and `python-zig` on PATH, from a venv in ~/.cache/ablate/zigbuild holding the
# pinned pip packages ziglang (zig's C toolchain, which links against any glibc's symbol
# versions) and cargo-zigbuild (which points cargo at it).
ZIG_PINS=(ziglang==0.17.0 cargo-zigbuild==0.24.0)
zig_venv="${ABLATE_ZIGBUILD_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ablate/zigbuild}"
if [ ! -f "$zig_venv/.pins" ] || [ "$(cat "$zig_venv/.pins")" != "${ZIG_PINS[*]}" ]; then
  echo "zigbuild-env: installing ${ZIG_PINS[*]} into $zig_venv (pip)" >&2
  rm -rf "$zig_venv"
  "${ABLATE_BASE_PYTHON:-python3}" -m venv "$zig_venv"
  "$zig_venv/bin/python" -m pip install --quiet --disable-pip-version-check "${ZIG_PINS[@]}"
  echo "${ZIG_PINS[*]}" >"$zig_venv/.pins"
fi
export PATH="$zig_venv/bin:$PATH"
