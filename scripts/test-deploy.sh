#!/usr/bin/env bash
# Runs the operator's kit (deploy/) as far as a machine without a Docker engine, a GPU or systemd
# as PID 1 allows. Called by scripts/lint-deploy.sh (and so by scripts/test); needs root (it makes
# namespaces, mounts and chroots) and the CPU binaries in target/debug (`cargo test --workspace
# --no-run`, which scripts/test runs first, builds them; so does `cargo build --workspace --bins`).
#
#   scripts/test-deploy.sh            # every check
#   scripts/test-deploy.sh bootstrap  # the checks whose names contain "bootstrap"
#
# Preparation installs what the checks need (apt: debootstrap, tini, logrotate; a cached Debian 11
# root, scripts/make-test-root.sh); the checks themselves reach no network: the bootstrap root
# runs in a network namespace of its own and everything else talks over loopback.
#
# Checks (each prints "ok NAME" or "FAILED NAME" with its log; a summary line closes):
#   bootstrap        deploy/bootstrap.sh end to end in a throwaway Debian 11 root (glibc 2.31,
#                    pip 20.3.4) lacking the CUDA libraries: stand-in NVIDIA wheels installed with
#                    the root's own pip, two stand-in GPU workers started as user ablate with the
#                    libraries found, a rerun, and a host without the driver
#   entrypoint       the rented-machine image's start line: deploy/docker/entrypoint.sh with
#                    ABLATE_WORKER_TOKEN and ABLATE_CA_PEM, the real worker registering over TLS
#                    with a real coordinator, the secrets in a private tmpfs file and gone from the
#                    environment, SIGTERM through tini
#   slurm-signals    deploy/slurm/ablate-worker.sbatch: Slurm's early warning, a job kill that
#                    signals every process, and a crash, each worker stopped by one SIGTERM
#   systemd-exec     the units' shell command lines, run as systemd would expand them
#   glibc-check      scripts/check-glibc.sh passes and fails where it should
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
filter="${1:-}"

[ "$(id -u)" = 0 ] || { echo "test-deploy: needs root (namespaces, mounts, chroot)" >&2; exit 1; }

work=$(mktemp -d /tmp/ablate-test-deploy.XXXXXX)
cleanup() {
  # Mounts live in the checks' own namespaces and are gone with them.
  rm -rf "$work"
}
trap cleanup EXIT

# --- preparation (may install packages) ------------------------------------------------------
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ "${#missing[@]}" = 0 ] && return 0
  echo "test-deploy: installing ${missing[*]} (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
}
wants() { [ -z "$filter" ] || [[ "$1" == *"$filter"* ]]; }

apt_install debootstrap tini logrotate openssl
root_cache=""
if wants bootstrap; then
  root_cache=$(bash scripts/make-test-root.sh bullseye)
fi
if wants entrypoint && { [ ! -x target/debug/ablate ] || [ ! -x target/debug/ablate-worker ]; }; then
  echo "test-deploy: target/debug/ablate and ablate-worker are missing: run \`cargo test --workspace --no-run\` first (scripts/test does)" >&2
  exit 1
fi

# Stand-ins (scripts/deploy-tests): CUDA libraries, a CUDA worker that needs them, wheels.
build_standins() {
  local d="$work/standin" libs=()
  mkdir -p "$d"
  for l in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudart.so.13 libnvrtc.so.13 libnccl.so.2; do
    cc -shared -fPIC -nostdlib -O2 -Wl,-soname,"$l" -o "$d/$l" scripts/deploy-tests/standin-lib.c
    ln -sf "$l" "$d/${l%%.so*}.so"
    libs+=("-l${l#lib}")
  done
  libs=("${libs[@]%%.so*}")
  cc -nostdlib -fno-stack-protector -fno-builtin -O2 -no-pie -o "$d/ablate-worker" \
    scripts/deploy-tests/standin-worker.c -L"$d" -Wl,--no-as-needed "${libs[@]}" \
    -Wl,-dynamic-linker,/lib64/ld-linux-x86-64.so.2
  python3 scripts/deploy-tests/make_wheels.py "$d" "$work/wheels"
}

# A private CA and a certificate for 127.0.0.1, and tokens.
make_secrets() {
  local s="$work/secrets"
  mkdir -p "$s"
  (
    cd "$s"
    umask 077
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
      -subj "/CN=ablate test CA" -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=coordinator" \
      -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >san.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile san.ext -out server.pem 2>/dev/null
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >worker.token
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >admin.token
  )
  cp "$s/ca.pem" "$work/ca.pem"
  cp "$s/worker.token" "$work/worker.token"
}

build_standins
make_secrets

# --- checks ----------------------------------------------------------------------------------
passed=0
failed=0
failures=()
check() {
  local name="$1"
  shift
  wants "$name" || return 0
  local log="$work/$name.log"
  local t0=$SECONDS
  if "$@" >"$log" 2>&1; then
    passed=$((passed + 1))
    echo "ok $name ($((SECONDS - t0)) s)"
  else
    failed=$((failed + 1))
    failures+=("$name")
    echo "FAILED $name ($((SECONDS - t0)) s):"
    sed 's/^/    /' "$log"
  fi
}

check_bootstrap() {
  unshare --mount --pid --fork --net --uts --mount-proc \
    bash scripts/deploy-tests/bootstrap-in-root.sh "$root_cache" "$work" "$repo"
}

check_slurm() {
  bash scripts/deploy-tests/slurm-signals.sh "$work" "$repo"
}
check_units() {
  python3 scripts/deploy-tests/unit_exec.py "$repo" "$work"
}
check_entrypoint() {
  bash scripts/deploy-tests/entrypoint-check.sh "$work" "$repo"
}
check_glibc() {
  bash scripts/deploy-tests/glibc-check.sh "$work" "$repo"
}

check bootstrap check_bootstrap
check entrypoint check_entrypoint
check slurm-signals check_slurm
check systemd-exec check_units
check glibc-check check_glibc

echo "test-deploy: $passed passed, $failed failed"
[ "$failed" = 0 ] || { echo "test-deploy: failed: ${failures[*]}" >&2; exit 1; }
