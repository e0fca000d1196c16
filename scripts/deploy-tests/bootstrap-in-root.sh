#!/usr/bin/env bash
# Runs deploy/bootstrap.sh end to end in a throwaway Debian 11 root, as on a rented GPU machine
# whose image lacks the CUDA libraries (the usual case). Called by scripts/test-deploy.sh inside
# fresh mount, PID, network and UTS namespaces (`unshare --mount --pid --fork --net --uts
# --mount-proc`), so nothing it starts outlives it and nothing can reach the network:
#
#   bootstrap-in-root.sh ROOT_CACHE WORK REPO
#
# ROOT_CACHE is the cached root (scripts/make-test-root.sh), never written: the test works on an
# overlay of it. WORK holds the stand-ins test-deploy.sh built: standin/ (libraries and the
# stand-in CUDA worker), wheels/ (stand-in NVIDIA wheels), ca.pem, worker.token.
#
# The host looks like a rented GPU box: the driver's libcuda.so.1 and nvidia-smi (stand-ins; two
# GPUs) are there, cuBLAS & co. are not, systemd does not run, pip is Debian's 20.3.4. Each
# failed expectation prints one line "FAIL: ..."; the exit status is the number of failures.
set -uo pipefail

cache="$1" work="$2" repo="$3"
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}
note() { echo "-- $*"; }
indent() { sed 's/^/   | /'; }

up="$work/overlay/up" scratch="$work/overlay/work" R="$work/overlay/root"
mkdir -p "$up" "$scratch" "$R"
mount -t overlay overlay -o "lowerdir=$cache,upperdir=$up,workdir=$scratch" "$R" || exit 90
mount -t proc proc "$R/proc" || exit 91
mount --bind /dev "$R/dev" || exit 92
mount -t tmpfs tmpfs "$R/run" || exit 93
mount -t tmpfs tmpfs "$R/tmp" || exit 94
hostname rented-box
ip link set lo up 2>/dev/null || true

# The driver: libcuda.so.1 where the driver package puts it, and nvidia-smi listing two GPUs.
cp "$work/standin/libcuda.so.1" "$R/usr/lib/x86_64-linux-gnu/libcuda.so.1"
cat >"$R/usr/bin/nvidia-smi" <<'EOF'
#!/bin/sh
# stand-in for the driver's nvidia-smi: two GPUs
[ "$1" = -L ] || exit 1
echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-11111111-1111-1111-1111-111111111111)"
EOF
chmod 0755 "$R/usr/bin/nvidia-smi"
# A logrotate drop-in folder, as on most distributions (minbase has no logrotate).
mkdir -p "$R/etc/logrotate.d"

kit="$R/root/kit"
mkdir -p "$kit" "$R/root/wheels"
cp "$repo/deploy/bootstrap.sh" "$repo/deploy/systemd/ablate-worker@.service" "$work/ca.pem" "$kit/"
cp "$work/standin/ablate-worker" "$kit/ablate-worker"
cp "$work/wheels/"*.whl "$R/root/wheels/"
token=$(cat "$work/worker.token")

# What the operator types (deploy/README.md, "Rented machines"), with pip pointed at the
# stand-in wheels instead of the package index (pip reads PIP_* settings from the environment).
run_bootstrap() {
  chroot "$R" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheels \
    bash -c 'cd /root/kit && ./bootstrap.sh --coordinator https://coord.example:7070 \
      --binary ./ablate-worker --ca ./ca.pem --token-stdin' <"$work/worker.token"
}

worker_pid() { cat "$R/run/ablate-worker.pid" 2>/dev/null; }

check_worker() {
  local pid="$1" uid cmd envs
  if [ -z "$pid" ] || [ ! -d "/proc/$pid" ]; then
    fail "no worker process (pid '$pid')"
    return
  fi
  # Give it a moment: a worker whose libraries are missing dies at once.
  sleep 1
  [ -d "/proc/$pid" ] || { fail "the worker (pid $pid) exited at once; log: $(tail -n 3 "$R/var/log/ablate-worker.log")"; return; }
  uid=$(stat -c %u "/proc/$pid")
  [ "$uid" = "$(chroot "$R" id -u ablate)" ] || fail "the worker runs as uid $uid, not ablate"
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  case "$cmd" in
    "/usr/local/bin/ablate-worker --all-gpus --name rented-box --token-file /etc/ablate/worker.token --work-dir /var/lib/ablate-worker --stop-grace 60s ") ;;
    *) fail "worker command line: $cmd" ;;
  esac
  envs=$(tr '\0' '\n' <"/proc/$pid/environ")
  echo "$envs" | grep -qx 'LD_LIBRARY_PATH=/opt/ablate/cuda-wheels/nvidia/cu13/lib:/opt/ablate/nccl-wheel/nvidia/nccl/lib' ||
    fail "worker environment lacks the CUDA/NCCL LD_LIBRARY_PATH: $(echo "$envs" | grep LD_LIBRARY_PATH)"
  echo "$envs" | grep -qx 'ABLATE_COORDINATOR=https://coord.example:7070' || fail "worker environment lacks ABLATE_COORDINATOR"
  echo "$envs" | grep -qx 'ABLATE_CA=/etc/ablate/ca.pem' || fail "worker environment lacks ABLATE_CA"
  echo "$envs" | grep -qx 'CUDA_DEVICE_ORDER=PCI_BUS_ID' || fail "worker environment lacks CUDA_DEVICE_ORDER"
  if grep -qF "$token" "/proc/$pid/cmdline" "/proc/$pid/environ"; then
    fail "the token is on the worker's command line or in its environment"
  fi
}

note "1. first run: CUDA libraries missing, installed from the wheels, two GPU workers started"
out=$(run_bootstrap 2>&1)
rc=$?
indent <<<"$out"
[ "$rc" = 0 ] || fail "bootstrap.sh exited $rc"
echo "$out" | grep -q 'installing the CUDA 13.0 runtime libraries (missing: ' || fail "it did not install the CUDA libraries"
echo "$out" | grep -q 'installing NCCL' || fail "it did not install NCCL"
echo "$out" | grep -q '2 GPU(s) found' || fail "it did not count the two GPUs"
grep -q "no such option" <<<"$out" && fail "pip rejected an option"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  [ -f "$R/opt/ablate/cuda-wheels/nvidia/cu13/lib/$lib" ] || fail "$lib not installed"
done
[ -f "$R/opt/ablate/nccl-wheel/nvidia/nccl/lib/libnccl.so.2" ] || fail "libnccl.so.2 not installed"
[ "$(grep -c '^LD_LIBRARY_PATH=' "$R/etc/ablate/worker.env")" = 1 ] || fail "worker.env: LD_LIBRARY_PATH not set once"
[ "$(chroot "$R" stat -c '%a %U %G' /etc/ablate/worker.token)" = "640 root ablate" ] ||
  fail "worker.token is $(chroot "$R" stat -c '%a %U %G' /etc/ablate/worker.token), want 640 root ablate"
[ "$(cat "$R/etc/ablate/worker.token")" = "$token" ] || fail "worker.token does not hold the token"
grep -qF "$token" "$R/etc/ablate/worker.env" && fail "the token is in worker.env"
[ "$(stat -c %a "$R/etc/ablate/worker.env")" = 644 ] || fail "worker.env is not 0644"
cmp -s "$work/ca.pem" "$R/etc/ablate/ca.pem" || fail "ca.pem not installed"
[ -f "$R/etc/logrotate.d/ablate-worker" ] || fail "no logrotate rule for /var/log/ablate-worker.log"
if command -v logrotate >/dev/null 2>&1; then
  sed "s#/var/log/#$R/var/log/#" "$R/etc/logrotate.d/ablate-worker" >"$work/logrotate.conf"
  logrotate --debug --state "$work/logrotate.state" "$work/logrotate.conf" >"$work/logrotate.out" 2>&1 ||
    fail "logrotate rejects the rule: $(tail -n 3 "$work/logrotate.out")"
  grep -qi 'error' "$work/logrotate.out" && fail "logrotate: $(grep -i error "$work/logrotate.out" | head -n 2)"
fi
pid1=$(worker_pid)
check_worker "$pid1"

note "2. second run: libraries already there, the running worker stopped and started again"
out=$(run_bootstrap 2>&1)
rc=$?
indent <<<"$out"
[ "$rc" = 0 ] || fail "second bootstrap.sh exited $rc"
echo "$out" | grep -q 'CUDA 13.0 runtime libraries are in /opt/ablate/cuda-wheels/nvidia/cu13/lib already' ||
  fail "the second run installed the libraries again"
echo "$out" | grep -q "stopping the running workers (pid $pid1" || fail "the second run did not stop pid $pid1"
[ -d "/proc/$pid1" ] && fail "the old worker $pid1 still runs"
pid2=$(worker_pid)
[ "$pid2" != "$pid1" ] || fail "no new worker"
check_worker "$pid2"
[ "$(grep -c '^LD_LIBRARY_PATH=' "$R/etc/ablate/worker.env")" = 1 ] || fail "worker.env: LD_LIBRARY_PATH not set once after a rerun"

note "3. no driver (libcuda.so.1 missing): a clear error, the running worker left alone"
rm -f "$R/usr/lib/x86_64-linux-gnu/libcuda.so.1"
out=$(run_bootstrap 2>&1)
rc=$?
indent <<<"$out"
[ "$rc" != 0 ] || fail "bootstrap.sh succeeded without the driver"
echo "$out" | grep -q 'libcuda.so.1 not found: this CUDA build needs the NVIDIA driver (580 or newer' ||
  fail "no clear message about the missing driver"
[ -d "/proc/$pid2" ] || fail "the running worker was stopped by a failed bootstrap"

exit "$fails"
