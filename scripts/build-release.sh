#!/usr/bin/env bash
# Release binaries (`ablate`, and the CPU `ablate-worker`) that start on older Linux hosts:
# linked against glibc 2.28, so they run on RHEL/Rocky/Alma 8 (2.28), Ubuntu 20.04 (2.31),
# Debian 11 (2.31) and everything newer. A plain `cargo build --release` on Debian 12 needs
# glibc 2.34 (__libc_start_main@GLIBC_2.34 and friends) and does not start there.
#
#   scripts/build-release.sh          # -> target/release-glibc/{ablate,ablate-worker}
#   ABLATE_GLIBC=2.31 scripts/build-release.sh
#
# How: `cargo zigbuild --target x86_64-unknown-linux-gnu.2.28` links with zig's C toolchain
# against glibc 2.28's symbol versions (the C parts, SQLite, mimalloc, ring, oniguruma, are
# compiled by it too). ziglang and cargo-zigbuild are pip packages, installed into a venv in
# ~/.cache/ablate/zigbuild; the Rust target is the host's own x86_64-unknown-linux-gnu, so no
# other rustup target is needed. Then:
#  - scripts/check-glibc.sh reads the newest GLIBC_ symbol version each binary imports and fails
#    above ABLATE_GLIBC;
#  - both binaries are started (--version) in a Debian 11 root (glibc 2.31;
#    scripts/make-test-root.sh, cached), which the Debian 12 build fails.
# The CUDA worker: ABLATE_GLIBC=2.28 scripts/build-cuda.sh (same toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC="${ABLATE_GLIBC:-2.28}"
case "$GLIBC" in
  2.[0-9][0-9]) ;;
  *) echo "build-release: ABLATE_GLIBC=$GLIBC: expected a version like 2.28" >&2; exit 2 ;;
esac
# shellcheck source=scripts/zigbuild-env.sh
. scripts/zigbuild-env.sh

triple=x86_64-unknown-linux-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/release-glibc}"
echo "build-release: cargo zigbuild --release --target $triple.$GLIBC (ziglang $(python-zig version))"
cargo zigbuild --release --locked --target "$triple.$GLIBC" -p coordinator -p worker --bins
out="$CARGO_TARGET_DIR"
cp "$CARGO_TARGET_DIR/$triple/release/ablate" "$CARGO_TARGET_DIR/$triple/release/ablate-worker" "$out/"
bash scripts/check-glibc.sh --max "$GLIBC" "$out/ablate" "$out/ablate-worker"

# Start them where the default build cannot: a Debian 11 root (glibc 2.31).
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && [ "${ABLATE_SKIP_RUN_CHECK:-0}" != 1 ]; then
  root=$(bash scripts/make-test-root.sh bullseye)
  scratch=$(mktemp -d)
  trap 'rm -rf "$scratch"' EXIT
  mkdir -p "$scratch/up" "$scratch/work" "$scratch/root"
  # shellcheck disable=SC2016  # expanded by the inner bash
  unshare --mount --fork bash -c '
    set -e
    mount -t overlay overlay -o "lowerdir=$1,upperdir=$2/up,workdir=$2/work" "$2/root"
    cp "$3/ablate" "$3/ablate-worker" "$2/root/usr/local/bin/"
    for b in ablate ablate-worker; do
      printf "build-release: in Debian 11 (glibc %s): " "$(chroot "$2/root" ldd --version | sed -n "1s/.* //p")"
      chroot "$2/root" /usr/local/bin/$b --version
    done' _ "$root" "$scratch" "$out"
else
  echo "build-release: not started in a Debian 11 root (needs root and unshare)"
fi
echo "build-release: $out/ablate and $out/ablate-worker need glibc $GLIBC or newer"
