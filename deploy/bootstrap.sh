#!/usr/bin/env bash
# Turn a rented GPU machine (or a CPU one) into ablate workers, in one command as root:
#
#   scp ablate-worker deploy/bootstrap.sh deploy/systemd/ablate-worker@.service ca.pem HOST:
#   ssh HOST 'sudo ./bootstrap.sh --coordinator https://coord.example:7070 --binary ./ablate-worker \
#                 --ca ./ca.pem --token-stdin' < worker.token
#
# It installs the worker binary, the Python package client it uses for corpus packages and (for a
# CUDA build whose libraries are missing) the CUDA 13.0 runtime wheels; creates the user
# `ablate`; writes /etc/ablate/{worker.token,worker.env,ca.pem}; then starts one worker per GPU:
# `ablate-worker@N` systemd units where systemd runs, otherwise `ablate-worker --all-gpus` in the
# background (containers rented by the hour rarely run systemd), logging to
# /var/log/ablate-worker.log. With no GPU it starts one CPU worker. Running it again updates the
# binary and settings and restarts the workers.
#
# The token is read from a file (--token-file) or standard input (--token-stdin), never from the
# command line, and is stored readable by root and the ablate group only.
set -euo pipefail

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'USAGE'
Options:
  --coordinator URL   https://HOST:PORT of the coordinator (or $ABLATE_COORDINATOR)
  --binary PATH       the ablate-worker binary to install (CPU or CUDA build)
  --ca PATH           PEM CA that signed the coordinator's certificate (private CA)
  --token-file PATH   file holding the worker token
  --token-stdin       read the worker token from standard input
  --unit PATH         ablate-worker@.service (default: systemd/ next to this script, or ./)
  --cpu               start one CPU worker even if GPUs are present
  --no-start          install and configure only
USAGE
}

die() {
  echo "bootstrap: $*" >&2
  exit 1
}

coordinator="${ABLATE_COORDINATOR:-}"
binary="" ca="" token_file="" token_stdin=0 unit="" cpu=0 start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --coordinator) coordinator="${2:?--coordinator needs a URL}"; shift 2 ;;
    --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
    --ca) ca="${2:?--ca needs a path}"; shift 2 ;;
    --token-file) token_file="${2:?--token-file needs a path}"; shift 2 ;;
    --token-stdin) token_stdin=1; shift ;;
    --unit) unit="${2:?--unit needs a path}"; shift 2 ;;
    --cpu) cpu=1; shift ;;
    --no-start) start=0; shift ;;
    -h | --help) usage; exit 0 ;;
    --token) die "--token: pass the token in a file (--token-file) or on stdin (--token-stdin), never as an argument" ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (it installs a binary, a user and services)"
[ -n "$coordinator" ] || die "--coordinator URL (or ABLATE_COORDINATOR) is required"
case "$coordinator" in
  https://*) ;;
  http://*) echo "bootstrap: warning: $coordinator is not TLS; the token crosses the network in clear text" >&2 ;;
  *) die "--coordinator $coordinator: expected https://HOST:PORT" ;;
esac
[ -n "$binary" ] || die "--binary PATH is required (build it with cargo or scripts/build-cuda.sh)"
[ -x "$binary" ] || die "--binary $binary: not an executable file"
if [ -n "$ca" ]; then
  grep -q -- '-----BEGIN CERTIFICATE-----' "$ca" || die "--ca $ca: no PEM certificate in it"
fi

# The token: one line, no spaces.
if [ "$token_stdin" = 1 ]; then
  IFS= read -r token || true
elif [ -n "$token_file" ]; then
  IFS= read -r token <"$token_file" || true
else
  die "give the worker token with --token-file PATH or --token-stdin"
fi
token="${token%$'\r'}"
[ -n "$token" ] || die "the worker token is empty"
case "$token" in *[[:space:]]*) die "the worker token holds whitespace: one token expected" ;; esac

here="$(cd "$(dirname "$0")" && pwd)"
if [ -z "$unit" ]; then
  for u in "$here/systemd/ablate-worker@.service" "$here/ablate-worker@.service"; do
    if [ -f "$u" ]; then unit="$u"; break; fi
  done
fi

# --- packages: the Python package client for corpus packages named in sweep files, and for the
# CUDA runtime wheels below.
if ! python3 -m pip --version >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing python3-pip"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 python3-pip ca-certificates >/dev/null
  else
    echo "bootstrap: warning: no python3 -m pip and no apt-get; sweeps naming pip packages will fail here" >&2
  fi
fi

# pip_target DIR PACKAGE==VERSION...: install wheels into a plain folder (never the system's
# Python). The distribution's pip may be old: Ubuntu 20.04 ships 20.0, which cannot read the
# manylinux_2_27 tags of NVIDIA's wheels (pip 20.3 can), and pip before 22.1 rejects
# --root-user-action (Ubuntu 22.04 ships 22.0.2), so that setting goes in the environment, where
# older pips ignore it. A pip older than 20.3 is first replaced by a current one in
# /opt/ablate/pip, for this script only.
pip_target() {
  local dir="$1"
  shift
  local pypath=""
  if ! python3 -c 'import sys, pip; v = tuple(int(x) for x in pip.__version__.split(".")[:2]); sys.exit(v < (20, 3))' 2>/dev/null; then
    if ! PYTHONPATH=/opt/ablate/pip python3 -c 'import sys, pip; v = tuple(int(x) for x in pip.__version__.split(".")[:2]); sys.exit(v < (20, 3))' 2>/dev/null; then
      echo "bootstrap: python3's pip is older than 20.3; installing a current pip into /opt/ablate/pip"
      rm -rf /opt/ablate/pip
      PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 python3 -m pip install --quiet --no-input \
        --target /opt/ablate/pip "pip>=20.3" || die "could not install a current pip into /opt/ablate/pip"
    fi
    pypath=/opt/ablate/pip
  fi
  PYTHONPATH="$pypath" PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
    python3 -m pip install --quiet --no-deps --no-input --upgrade --target "$dir" "$@"
}

# --- user, binary, settings.
if ! id ablate >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/ablate-worker --shell /usr/sbin/nologin ablate
fi
install -d -m 0755 /etc/ablate /usr/local/bin
install -d -o ablate -g ablate -m 0750 /var/lib/ablate-worker /var/cache/ablate
# The new binary and settings are checked under .new names and replace the running ones only
# when they start here; a failed run leaves the workers as they were.
new_bin=/usr/local/bin/ablate-worker.new
install -m 0755 "$binary" "$new_bin"
(
  umask 027
  printf '%s\n' "$token" >/etc/ablate/worker.token.new
)
chown root:ablate /etc/ablate/worker.token.new
chmod 0640 /etc/ablate/worker.token.new
mv -f /etc/ablate/worker.token.new /etc/ablate/worker.token
unset token

env_file=/etc/ablate/worker.env
{
  echo "# written by deploy/bootstrap.sh"
  echo "ABLATE_COORDINATOR=$coordinator"
  echo "ABLATE_CACHE=/var/cache/ablate"
  if [ -n "$ca" ]; then
    install -m 0644 "$ca" /etc/ablate/ca.pem
    echo "ABLATE_CA=/etc/ablate/ca.pem"
  fi
} >"$env_file.new"

# --- GPUs: nvidia-smi, else the driver's /proc entries.
gpus=0
if [ "$cpu" = 0 ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  elif [ -d /proc/driver/nvidia/gpus ]; then
    gpus=$(find /proc/driver/nvidia/gpus -mindepth 1 -maxdepth 1 -type d | wc -l)
  fi
fi
echo "bootstrap: $gpus GPU(s) found"

# --- a CUDA build needs cuBLAS, cuRAND, NVRTC and the CUDA runtime 13 next to the driver, and a
# worker built with the nccl feature (multi-GPU trials) NCCL too: NVIDIA's wheels, installed into
# /opt/ablate when `ldd` misses them, found through LD_LIBRARY_PATH in worker.env.
cuda_dir=/opt/ablate/cuda-wheels
cuda_lib=$cuda_dir/nvidia/cu13/lib
nccl_dir=/opt/ablate/nccl-wheel
nccl_lib=$nccl_dir/nvidia/nccl/lib
needs=$(ldd "$new_bin" 2>/dev/null | awk '/not found/ {print $1}' || true)
lib_path=()
if echo "$needs" | grep -qE 'cublas|curand|cudart|nvrtc'; then
  if ! LD_LIBRARY_PATH=$cuda_lib ldd "$new_bin" 2>/dev/null | grep -E 'cublas|curand|cudart|nvrtc' | grep -q 'not found'; then
    echo "bootstrap: the CUDA 13.0 runtime libraries are in $cuda_lib already"
  else
    echo "bootstrap: installing the CUDA 13.0 runtime libraries (missing: $(echo "$needs" | grep -E 'cublas|curand|cudart|nvrtc' | tr '\n' ' '))"
    pip_target "$cuda_dir" nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
      nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  fi
  lib_path+=("$cuda_lib")
fi
if echo "$needs" | grep -q 'libnccl'; then
  if [ -e "$nccl_lib/libnccl.so.2" ]; then
    echo "bootstrap: NCCL is in $nccl_lib already"
  else
    echo "bootstrap: installing NCCL (libnccl.so.2) for multi-GPU trials"
    pip_target "$nccl_dir" nvidia-nccl-cu13==2.30.7
  fi
  lib_path+=("$nccl_lib")
fi
if [ "${#lib_path[@]}" -gt 0 ]; then
  (
    IFS=:
    echo "LD_LIBRARY_PATH=${lib_path[*]}"
  ) >>"$env_file.new"
fi
chmod 0644 "$env_file.new"

# GPU indices as nvidia-smi numbers them, for every worker started here.
export CUDA_DEVICE_ORDER=PCI_BUS_ID

# as_worker CMD...: run CMD as the service would, user ablate with the new worker.env's settings
# in its environment (LD_LIBRARY_PATH above among them).
as_worker() (
  set -a
  # shellcheck source=/dev/null
  . "$env_file.new"
  set +a
  exec setpriv --reuid=ablate --regid=ablate --init-groups "$@"
)

# What the loader still cannot find is not ours to install: say what is.
still=$(as_worker ldd "$new_bin" 2>/dev/null | awk '/not found/ {print $1}' || true)
if [ -n "$still" ]; then
  for lib in $still; do
    case "$lib" in
      libcuda.so.1) echo "bootstrap: libcuda.so.1 not found: this CUDA build needs the NVIDIA driver (580 or newer, CUDA 13.0); install it, or use the CPU build of ablate-worker" >&2 ;;
      *) echo "bootstrap: $lib not found for $binary" >&2 ;;
    esac
  done
  rm -f "$new_bin" "$env_file.new"
  die "$binary cannot start here (libraries missing, above); nothing was changed"
fi
if ! as_worker "$new_bin" --version >/dev/null; then
  rm -f "$new_bin" "$env_file.new"
  die "$binary does not start here (see the error above); nothing was changed"
fi
as_worker test -r /etc/ablate/worker.token || die "user ablate cannot read /etc/ablate/worker.token"
mv -f "$new_bin" /usr/local/bin/ablate-worker
mv -f "$env_file.new" "$env_file"
[ "$start" = 1 ] || { echo "bootstrap: installed; not started (--no-start)"; exit 0; }

if [ "$gpus" -gt 0 ]; then
  instances=()
  for ((i = 0; i < gpus; i++)); do instances+=("ablate-worker@$i"); done
else
  instances=("ablate-worker@cpu")
fi

if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  [ -n "$unit" ] || die "systemd runs here but ablate-worker@.service was not found (--unit PATH)"
  install -m 0644 "$unit" /etc/systemd/system/ablate-worker@.service
  # Bounded logs: the journald drop-in, when it came along with the unit.
  jconf="$(dirname "$unit")/journald-ablate.conf"
  if [ -f "$jconf" ] && ! cmp -s "$jconf" /etc/systemd/journald.conf.d/ablate.conf; then
    install -D -m 0644 "$jconf" /etc/systemd/journald.conf.d/ablate.conf
    systemctl restart systemd-journald || echo "bootstrap: warning: systemd-journald did not restart; the log limits apply after its next start" >&2
  elif [ ! -f "$jconf" ]; then
    echo "bootstrap: note: no journald-ablate.conf next to $unit: the journal keeps the distribution's limits" >&2
  fi
  systemctl daemon-reload
  systemctl enable "${instances[@]}" >/dev/null 2>&1
  systemctl restart "${instances[@]}"
  echo "bootstrap: started ${instances[*]} (journalctl -u 'ablate-worker@*' -f)"
  exit 0
fi

# No systemd: one supervisor process, restarted by running this script again.
pidfile=/run/ablate-worker.pid
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  old=$(cat "$pidfile")
  echo "bootstrap: stopping the running workers (pid $old; they checkpoint first)"
  kill -TERM "$old"
  # The stop budget (deploy/README.md, "Stopping"): a worker exits at most its stop grace (60 s,
  # --stop-grace below) after SIGTERM; wait 90 s before SIGKILL.
  for _ in $(seq 1 90); do
    kill -0 "$old" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$old" 2>/dev/null; then
    echo "bootstrap: pid $old still runs after 90 s: killing it" >&2
    kill -KILL "$old" 2>/dev/null || true
  fi
fi
host=$(uname -n)
mode=(--device cpu --name "$host-cpu")
if [ "$gpus" -gt 0 ]; then mode=(--all-gpus --name "$host"); fi
log=/var/log/ablate-worker.log
touch "$log"
chown ablate:ablate "$log"
# Bounded logs: logrotate (where installed) rotates the log daily or at 100 MB and keeps 7;
# copytruncate, since the worker keeps its log open (it is appended to, so truncation is safe).
if [ -d /etc/logrotate.d ]; then
  cat >/etc/logrotate.d/ablate-worker <<LOGROTATE
$log {
    daily
    maxsize 100M
    rotate 7
    compress
    missingok
    notifempty
    copytruncate
}
LOGROTATE
else
  echo "bootstrap: warning: no logrotate here: $log grows without bound (truncate it now and then)" >&2
fi
# Export the settings of worker.env into the worker's environment.
set -a
# shellcheck source=/dev/null
. "$env_file"
set +a
# setsid: its own session, so a closing ssh session or a Ctrl-C there does not reach it; the pid
# is the worker's own (setsid does not fork here, and nohup and setpriv exec).
setsid nohup setpriv --reuid=ablate --regid=ablate --init-groups \
  /usr/local/bin/ablate-worker "${mode[@]}" --token-file /etc/ablate/worker.token \
  --work-dir /var/lib/ablate-worker --stop-grace 60s >>"$log" 2>&1 </dev/null &
echo $! >"$pidfile"
echo "bootstrap: started ablate-worker ${mode[*]} as pid $! (log $log;"
echo "           stop with: kill -TERM \$(cat $pidfile))"
