#!/usr/bin/env bash
# scripts/check-glibc.sh on binaries whose needs are known: a stand-in C library that defines
# symbols at versions GLIBC_2.2.5 and GLIBC_2.34 (so the result does not depend on this machine's
# glibc), and two programs linked against it, one using only the old symbol, one the new one.
#   glibc-check.sh WORK REPO
set -uo pipefail
work="$1" repo="$2"
d="$work/glibc"
mkdir -p "$d"
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}
cat >"$d/fakec.c" <<'C'
void ablate_old_symbol(void) {}
void ablate_new_symbol(void) {}
C
printf 'GLIBC_2.2.5 { global: ablate_old_symbol; local: *; };\nGLIBC_2.34 { global: ablate_new_symbol; } GLIBC_2.2.5;\n' >"$d/fakec.map"
cc -shared -fPIC -nostdlib -Wl,--version-script="$d/fakec.map" -Wl,-soname,libfakec.so.6 \
  -o "$d/libfakec.so.6" "$d/fakec.c" || exit 1
for which in old new; do
  printf 'extern void ablate_%s_symbol(void);\nvoid _start(void) { ablate_%s_symbol(); for (;;) {} }\n' "$which" "$which" >"$d/$which.c"
  cc -nostdlib -no-pie -o "$d/$which" "$d/$which.c" -L"$d" -l:libfakec.so.6 || exit 1
done
c="$repo/scripts/check-glibc.sh"
bash "$c" --max 2.28 "$d/old" || fail "a binary needing GLIBC_2.2.5 failed --max 2.28"
out=$(bash "$c" --max 2.28 "$d/new" 2>&1) && fail "a binary needing GLIBC_2.34 passed --max 2.28"
grep -q 'needs glibc 2.34 (newer than 2.28), for: ablate_new_symbol' <<<"$out" || fail "no clear message: $out"
bash "$c" --max 2.34 "$d/new" || fail "a binary needing GLIBC_2.34 failed --max 2.34"
bash "$c" --max 2.28 "$d/old" "$d/new" >/dev/null 2>&1 && fail "one failing binary of two did not fail the check"
bash "$c" --max 2.28 "$d/missing" >/dev/null 2>&1 && fail "a missing binary passed"
exit "$fails"
