#!/usr/bin/env bash
# The newest glibc an ELF binary needs, checked against a limit:
#
#   scripts/check-glibc.sh --max 2.28 target/release-glibc/.../ablate target/.../ablate-worker
#
# Reads the versioned symbols each binary imports (objdump -T, the GLIBC_x.y versions the
# dynamic loader checks at start), prints the newest one per binary with the symbols that need
# it, and exits 1 if any binary needs a glibc newer than --max. RHEL 8 has glibc 2.28, Ubuntu
# 20.04 2.31, Debian 11 2.31, Ubuntu 22.04 2.35, Debian 12 2.36.
set -euo pipefail

max=""
bins=()
while [ $# -gt 0 ]; do
  case "$1" in
    --max) max="${2:?--max needs a version like 2.28}"; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) bins+=("$1"); shift ;;
  esac
done
[ -n "$max" ] || { echo "check-glibc: --max VERSION is required" >&2; exit 2; }
[ "${#bins[@]}" -gt 0 ] || { echo "check-glibc: name at least one binary" >&2; exit 2; }
command -v objdump >/dev/null 2>&1 || { echo "check-glibc: objdump (binutils) is missing" >&2; exit 2; }

# ver_gt A B: A is a newer version than B (x.y[.z] compared field by field).
ver_gt() {
  [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -n 1)" = "$1" ]
}

status=0
for b in "${bins[@]}"; do
  [ -f "$b" ] || { echo "check-glibc: $b: no such file" >&2; status=1; continue; }
  syms=$(objdump -T "$b" 2>/dev/null) || { echo "check-glibc: $b: not an ELF binary objdump can read" >&2; status=1; continue; }
  # Lines like: 0000000000000000      DF *UND*  0000000000000000 (GLIBC_2.34) __libc_start_main
  versions=$(grep -oE 'GLIBC_[0-9]+(\.[0-9]+)+' <<<"$syms" | sed 's/^GLIBC_//' | sort -uV || true)
  if [ -z "$versions" ]; then
    echo "check-glibc: $b needs no versioned glibc symbol"
    continue
  fi
  newest=$(tail -n 1 <<<"$versions")
  who=$(grep -E "GLIBC_${newest//./\\.}\)?[[:space:]]" <<<"$syms" | awk '{print $NF}' | sort -u | head -n 5 | tr '\n' ' ')
  if ver_gt "$newest" "$max"; then
    echo "check-glibc: $b needs glibc $newest (newer than $max), for: $who" >&2
    status=1
  else
    echo "check-glibc: $b needs glibc $newest (at most $max: ok)"
  fi
done
exit "$status"
