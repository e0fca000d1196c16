#!/usr/bin/env bash
# Make (once) and cache a minimal Debian root file system for the deploy kit's tests:
#
#   scripts/make-test-root.sh bullseye     # prints the root's path
#
# The root is Debian 11 "bullseye" (minbase, plus python3-pip and ca-certificates): glibc 2.31
# (as Ubuntu 20.04) and pip 20.3.4, older than the pip 22.1 that `--root-user-action` needs (Ubuntu
# 22.04 ships 22.0.2), so a script that runs there runs on the older hosts an operator rents.
# It is downloaded with debootstrap from the Debian mirror this machine's apt already uses (it is
# installing packages, so the test command does it, not a test) and kept in
# ~/.cache/ablate/test-roots/SUITE; tests never write to it (they work on an overlay or a copy).
set -euo pipefail

suite="${1:?usage: make-test-root.sh SUITE}"
case "$suite" in
  bullseye) ;;
  *) echo "make-test-root: suite $suite: only bullseye is made here" >&2; exit 2 ;;
esac
packages="python3,python3-pip,ca-certificates"
cache="${ABLATE_TEST_ROOTS:-${XDG_CACHE_HOME:-$HOME/.cache}/ablate/test-roots}"
root="$cache/$suite"
stamp="$root/.ablate-root"
want="$suite minbase $packages"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$root"
  exit 0
fi

[ "$(id -u)" = 0 ] || { echo "make-test-root: debootstrap needs root" >&2; exit 1; }
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "make-test-root: installing debootstrap (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

# The mirror apt is configured with (deb822 sources or the classic list), never a name of ours.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print ($2 ~ /^\[/ ? $3 : $2); exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || { echo "make-test-root: no Debian mirror found in the apt sources" >&2; exit 1; }

echo "make-test-root: debootstrap $suite into $root (a few minutes, once)" >&2
rm -rf "$root.tmp"
mkdir -p "$cache"
debootstrap --variant=minbase --include="$packages" "$suite" "$root.tmp" "$mirror" >"$cache/$suite.log" 2>&1 || {
  tail -n 20 "$cache/$suite.log" >&2
  echo "make-test-root: debootstrap failed (log $cache/$suite.log)" >&2
  exit 1
}
# No apt lists or package cache in the cached root (the tests install nothing with apt).
rm -rf "$root.tmp/var/cache/apt/archives/"*.deb "$root.tmp/var/lib/apt/lists/"*
echo "$want" >"$root.tmp/.ablate-root"
rm -rf "$root"
mv "$root.tmp" "$root"
echo "$root"
