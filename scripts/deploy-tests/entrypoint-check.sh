#!/usr/bin/env bash
# The rented-machine start line without Docker: what `docker run -e ABLATE_COORDINATOR=...
# -e ABLATE_WORKER_TOKEN=... -e ABLATE_CA_PEM=... IMAGE` does inside the container, run directly.
# A real coordinator (TLS with a private CA, tokens on, loopback) and the real CPU worker; the
# image's entrypoint (deploy/docker/entrypoint.sh) as uid 10001 in its own PID and mount
# namespaces with a private /dev/shm, as a container has; tini from Debian's package.
#
#   entrypoint-check.sh WORK REPO      (WORK holds secrets/ from test-deploy.sh)
#
# Expected: the worker registers with the coordinator (its metrics count it); the token and the
# CA are in private files on a tmpfs and in neither tini's nor the worker's environment; SIGTERM
# to tini stops the worker cleanly (exit 0). And the entrypoint's clear errors: a CA variable
# without a PEM; a mounted token file uid 10001 cannot read, as `docker run -v /etc/ablate:...`
# with a root-only token gives, and the same file readable through --group-add.
set -uo pipefail
work="$1" repo="$2"
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}
s="$work/secrets"
ep="$work/ep"
mkdir -p "$ep/bin" "$ep/cache" "$ep/work"
chmod 0711 "$work"
cp "$repo/target/debug/ablate-worker" "$repo/deploy/docker/entrypoint.sh" "$ep/bin/"
chmod 0755 "$ep/bin/"*
chown -R 10001:10001 "$ep/cache" "$ep/work"
token=$(cat "$s/worker.token")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
mport=$(free_port)
"$repo/target/debug/ablate" serve --listen "127.0.0.1:$port" --state "$work/ep-state" \
  --worker-token-file "$s/worker.token" --admin-token-file "$s/admin.token" \
  --tls-cert "$s/server.pem" --tls-key "$s/server.key" --metrics-listen "127.0.0.1:$mport" \
  >"$work/ep-coordinator.log" 2>&1 &
coord=$!
trap 'kill "$coord" 2>/dev/null; wait "$coord" 2>/dev/null' EXIT
registered() { curl -s "http://127.0.0.1:$mport/metrics" | awk '$1 == "ablate_workers_registered" {print $2}'; }
for _ in $(seq 1 50); do
  [ -n "$(registered)" ] && break
  sleep 0.2
done
[ "$(registered)" = 0 ] || { fail "coordinator not up: $(tail -n 5 "$work/ep-coordinator.log")"; exit 1; }

# The container: PID namespace (the entrypoint is its first process, then tini), mount namespace
# with a private tmpfs on /dev/shm, uid 10001, only the variables a marketplace would pass.
cat >"$ep/container.sh" <<'EOF'
#!/usr/bin/env bash
set -uo pipefail
ep="$1" port="$2" token="$3" ca="$4" out="$5"
mount -t tmpfs -o mode=1777 tmpfs /dev/shm || exit 90
setpriv --reuid 10001 --regid 10001 --clear-groups env -i PATH="$ep/bin:/usr/bin:/bin" HOME=/nonexistent \
  ABLATE_COORDINATOR="https://127.0.0.1:$port" ABLATE_WORKER_TOKEN="$token" ABLATE_CA_PEM="$ca" \
  ABLATE_CACHE="$ep/cache" ABLATE_WORKER_NAME=rented RUST_LOG=info \
  "$ep/bin/entrypoint.sh" ablate-worker --device cpu --work-dir "$ep/work/w" >"$out/worker.log" 2>&1 &
init=$!
echo "$init" >"$out/init.pid"
# The checks run in here, where the container's /proc and /dev/shm are.
for _ in $(seq 1 100); do
  grep -q 'registered' "$out/worker.log" && break
  sleep 0.2
done
worker=""
for p in /proc/[0-9]*; do
  [ "$(awk '{print $4}' "$p/stat" 2>/dev/null)" = "$init" ] && worker="${p#/proc/}"
done
echo "$worker" >"$out/worker.pid"
{
  echo "init_cmdline=$(tr '\0' ' ' <"/proc/$init/cmdline")"
  echo "init_comm=$(cat "/proc/$init/comm")"
  tr '\0' '\n' <"/proc/$init/environ" | sed 's/^/init_env:/'
  if [ -n "$worker" ]; then
    echo "worker_cmdline=$(tr '\0' ' ' <"/proc/$worker/cmdline")"
    echo "worker_uid=$(stat -c %u "/proc/$worker")"
    tr '\0' '\n' <"/proc/$worker/environ" | sed 's/^/worker_env:/'
    f=$(tr '\0' '\n' <"/proc/$worker/environ" | sed -n 's/^ABLATE_WORKER_TOKEN_FILE=//p')
    c=$(tr '\0' '\n' <"/proc/$worker/environ" | sed -n 's/^ABLATE_CA=//p')
    echo "token_file=$f"
    echo "token_stat=$(stat -c '%a %u' "$f")"
    echo "token_fs=$(stat -f -c %T "$f")"
    echo "token_content=$(cat "$f")"
    echo "ca_stat=$(stat -c '%a %u' "$c")"
    echo "ca_same=$(cmp -s "$c" "$out/ca.pem" && echo yes || echo no)"
  fi
} >"$out/facts"
touch "$out/facts.done"
# Stop the container as `docker stop` does: SIGTERM to its first process.
for _ in $(seq 1 100); do [ -f "$out/go-stop" ] && break; sleep 0.1; done
t0=$SECONDS
kill -TERM "$init"
wait "$init"
echo "init_exit=$? after $((SECONDS - t0)) s" >>"$out/facts"
EOF
out="$work/ep-out"
mkdir -p "$out"
cp "$s/ca.pem" "$out/ca.pem"
# Marketplace forms often cannot hold newlines: the CA as one line with \n.
ca_one_line=$(awk '{printf "%s\\n", $0}' "$s/ca.pem")
unshare --pid --fork --mount --mount-proc bash "$ep/container.sh" "$ep" "$port" "$token" "$ca_one_line" "$out" &
box=$!
for _ in $(seq 1 200); do [ -f "$out/facts.done" ] && break; sleep 0.1; done
[ "$(registered)" = 1 ] || fail "the coordinator counts $(registered) registered workers, want 1"
touch "$out/go-stop"
wait "$box"
facts="$out/facts"
echo "--- worker log"
sed 's/^/   | /' "$out/worker.log"
echo "--- facts"
grep -v '^token_content=' "$facts" | sed 's/^/   | /'
want() { grep -qxF "$1" "$facts" || fail "want '$1'"; }
grep -q '^init_cmdline=.*tini -s -- ablate-worker --name rented --device cpu ' "$facts" ||
  fail "tini does not run the worker: $(grep init_cmdline "$facts")"
want "init_comm=tini"
want "worker_uid=10001"
want "token_stat=600 10001"
want "token_fs=tmpfs"
want "token_content=$token"
want "ca_stat=600 10001"
want "ca_same=yes"
grep -q '^token_file=/dev/shm/ablate-' "$facts" || fail "the token file is not in /dev/shm: $(grep token_file= "$facts")"
for who in init worker; do
  grep -q "^${who}_env:ABLATE_WORKER_TOKEN=" "$facts" && fail "ABLATE_WORKER_TOKEN is in the $who's environment"
  grep -q "^${who}_env:ABLATE_CA_PEM=" "$facts" && fail "ABLATE_CA_PEM is in the $who's environment"
  grep "^${who}_" "$facts" | grep -qF "$token" && fail "the token is in the $who's command line or environment"
done
grep -q '^init_exit=0 ' "$facts" || fail "SIGTERM to tini: $(grep init_exit "$facts"), want exit 0"
grep -q 'registered' "$out/worker.log" || fail "the worker did not register"

# --- the entrypoint's errors, and the README's --group-add recipe.
run_ep() { # run_ep GROUPS VAR=VALUE... -- CMD...: the entrypoint as uid 10001 with those groups
  local groups="$1"
  shift
  setpriv --reuid 10001 --regid 10001 "$groups" env -i PATH="$ep/bin:/usr/bin:/bin" HOME=/nonexistent "$@"
}
out2=$(run_ep --clear-groups ABLATE_CA_PEM="not a certificate" "$ep/bin/entrypoint.sh" ablate-worker --version 2>&1)
rc=$?
if [ "$rc" != 2 ] || ! grep -q 'ABLATE_CA_PEM holds no PEM certificate' <<<"$out2"; then
  fail "a bad ABLATE_CA_PEM: exit $rc, $out2"
fi

mkdir -p "$ep/etc-ablate"
chmod 0755 "$ep/etc-ablate"
install -m 0600 -o root -g root "$s/worker.token" "$ep/etc-ablate/worker.token"
out2=$(run_ep --clear-groups ABLATE_WORKER_TOKEN_FILE="$ep/etc-ablate/worker.token" "$ep/bin/entrypoint.sh" ablate-worker --version 2>&1)
rc=$?
if [ "$rc" != 2 ] || ! grep -q 'is not readable by uid 10001' <<<"$out2" || ! grep -q -- '--group-add' <<<"$out2"; then
  fail "a root-only mounted token: exit $rc, $out2"
fi
# The README's way: the token root:ablate 0640 on the host, the container in the group ablate.
gid=4242
chgrp "$gid" "$ep/etc-ablate/worker.token"
chmod 0640 "$ep/etc-ablate/worker.token"
out2=$(run_ep --groups="$gid" ABLATE_WORKER_TOKEN_FILE="$ep/etc-ablate/worker.token" "$ep/bin/entrypoint.sh" ablate-worker --version 2>&1)
rc=$?
if [ "$rc" != 0 ] || ! grep -q '^ablate-worker ' <<<"$out2"; then
  fail "the token through --group-add: exit $rc, $out2"
fi

exit "$fails"
