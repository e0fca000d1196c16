#!/usr/bin/env bash
# Static checks of the operator's kit, run by scripts/test:
#  - shellcheck on every shell script in the repository (*.sh, *.sbatch, and files under
#    scripts/, .ci/ and deploy/ whose first line names sh or bash); Debian's `shellcheck` is
#    installed with apt-get when missing;
#  - `systemd-analyze verify` on the systemd units in deploy/systemd, where systemd-analyze
#    exists. It only warns about most mistakes (unknown keys, bad values) and still exits 0, so any
#    output counts as a failure. The units name /usr/local/bin/ablate*, which verify wants to
#    exist: they are checked as copies pointing at stand-in executables.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v shellcheck >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "lint-deploy: installing shellcheck (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null ||
      { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; }
  else
    echo "lint-deploy: shellcheck is missing and cannot be installed here (needs root and apt-get)" >&2
    exit 1
  fi
fi

scripts=()
while IFS= read -r -d '' f; do
  case "$f" in
    *.sh | *.sbatch) scripts+=("$f") ;;
    scripts/* | .ci/* | deploy/*)
      if head -n 1 "$f" | grep -Eq '^#!.*([/ ]|env )(ba|da)?sh( |$)'; then
        scripts+=("$f")
      fi
      ;;
  esac
done < <(git ls-files -z --cached --others --exclude-standard)
echo "lint-deploy: shellcheck on ${#scripts[@]} scripts"
shellcheck --severity=style "${scripts[@]}"

if command -v systemd-analyze >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/bin"
  for b in ablate ablate-worker; do
    printf '#!/bin/sh\nexit 0\n' >"$tmp/bin/$b"
    chmod +x "$tmp/bin/$b"
  done
  units=()
  for u in deploy/systemd/*.service; do
    name=$(basename "$u")
    # A template is verified as one instance of it.
    name=${name/@./@0.}
    sed "s#/usr/local/bin/#$tmp/bin/#g" "$u" >"$tmp/$name"
    units+=("$tmp/$name")
  done
  echo "lint-deploy: systemd-analyze verify on ${#units[@]} units"
  out=$(cd "$tmp" && systemd-analyze verify "${units[@]}" 2>&1) || {
    echo "$out" >&2
    exit 1
  }
  if [ -n "$out" ]; then
    echo "$out" >&2
    echo "lint-deploy: systemd-analyze verify reported problems (above)" >&2
    exit 1
  fi
else
  echo "lint-deploy: SKIPPED systemd-analyze verify (no systemd-analyze on this machine)"
fi
echo "lint-deploy: ok"
