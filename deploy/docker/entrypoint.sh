#!/bin/sh
# Entrypoint of the ablate images (/usr/local/bin/ablate-entrypoint): secrets from the environment
# into private files, then the command under tini, which forwards signals to it.
#
# Rented-GPU marketplaces start an image with environment variables and nothing else (no mounted
# files, no command line of yours), so the worker token and the CA may come as variables:
#
#   ABLATE_WORKER_TOKEN   the worker token itself; written to a private file on a tmpfs
#                         (/dev/shm/ablate-XXXXXX/worker.token, mode 0600), exported as
#                         ABLATE_WORKER_TOKEN_FILE, and dropped from the environment
#   ABLATE_CA_PEM         the PEM CA certificate (newlines may be written as \n); written next to
#                         it, exported as ABLATE_CA, dropped from the environment
#   ABLATE_WORKER_NAME    optional prefix of the workers' names (default: the container's hostname)
#
# Dropping them matters: the worker runs pip for corpus packages, and nothing it starts should
# inherit the token. Mounted files (ABLATE_WORKER_TOKEN_FILE, ABLATE_CA; compose and Kubernetes)
# are used as they are, after a check that this user can read them.
#
# The default command (CMD) is `ablate-worker --all-gpus`: one worker per GPU the container sees.
# The image runs this script as PID 1; it execs tini (as PID 1, or as a subreaper under
# `docker run --init`), which runs the command and forwards SIGTERM to it.
set -eu

die() {
  echo "ablate-entrypoint: $*" >&2
  exit 2
}

uid=$(id -u)

# A private folder on a tmpfs: the secrets never touch the container's disk.
secret_dir() {
  if [ -z "${secrets:-}" ]; then
    for base in "${ABLATE_SECRETS_DIR:-}" /dev/shm /run/user/"$uid" "${TMPDIR:-/tmp}"; do
      if [ -z "$base" ] || [ ! -d "$base" ] || [ ! -w "$base" ]; then continue; fi
      secrets=$(umask 077 && mktemp -d "$base/ablate-XXXXXX") || continue
      if [ "$(stat -f -c %T "$secrets" 2>/dev/null)" != tmpfs ]; then
        echo "ablate-entrypoint: warning: $secrets is not on a tmpfs; the secrets are on disk" >&2
      fi
      break
    done
    [ -n "${secrets:-}" ] || die "no writable folder for the secrets (/dev/shm, \$TMPDIR)"
  fi
}

if [ -n "${ABLATE_WORKER_TOKEN:-}" ]; then
  token=$(printf '%s' "$ABLATE_WORKER_TOKEN" | tr -d '\r\n')
  case "$token" in
    *[[:space:]]*) die "ABLATE_WORKER_TOKEN holds whitespace: one token expected" ;;
    "") die "ABLATE_WORKER_TOKEN is empty" ;;
  esac
  secret_dir
  (umask 077 && printf '%s\n' "$token" >"$secrets/worker.token")
  unset token
  ABLATE_WORKER_TOKEN_FILE="$secrets/worker.token"
  export ABLATE_WORKER_TOKEN_FILE
fi
unset ABLATE_WORKER_TOKEN

if [ -n "${ABLATE_CA_PEM:-}" ]; then
  secret_dir
  # printf %b turns the two characters \n into a newline (PEM has no other backslashes); $(...)
  # drops trailing newlines, one is added back.
  pem=$(printf '%b' "$ABLATE_CA_PEM")
  (umask 077 && printf '%s\n' "$pem" >"$secrets/ca.pem")
  unset pem
  grep -q -- '-----BEGIN CERTIFICATE-----' "$secrets/ca.pem" ||
    die "ABLATE_CA_PEM holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
  ABLATE_CA="$secrets/ca.pem"
  export ABLATE_CA
fi
unset ABLATE_CA_PEM

# Mounted secrets: say what to do when this user cannot read them (the image runs as uid 10001;
# a token installed root-only on the host is not readable in here).
for var in ABLATE_WORKER_TOKEN_FILE ABLATE_CA; do
  eval "f=\${$var:-}"
  [ -n "$f" ] || continue
  if [ ! -r "$f" ]; then
    die "$var=$f is not readable by uid $uid (groups $(id -G)): make it readable by this user or \
one of these groups, e.g. chgrp ablate + chmod 0640 on the host and docker run --group-add \
\$(getent group ablate | cut -d: -f3), or pass the secret itself in ABLATE_WORKER_TOKEN / ABLATE_CA_PEM"
  fi
done

[ "$#" -gt 0 ] || set -- ablate-worker --all-gpus
if [ "$1" = ablate-worker ] && [ -n "${ABLATE_WORKER_NAME:-}" ]; then
  case " $* " in
    *" --name "* | *" --name="*) ;;
    *)
      shift
      set -- ablate-worker --name "$ABLATE_WORKER_NAME" "$@"
      ;;
  esac
fi

tini=$(command -v tini || echo /usr/bin/tini)
exec "$tini" -s -- "$@"
