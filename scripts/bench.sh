#!/usr/bin/env bash
# ablate vs PyTorch eager, one training step of the same GPT-2 on the same batch (float32, CPU).
#
#   scripts/bench.sh [--reps R] [--threads T] [--steps N] [--out FILE] [CONFIG ...]
#
# CONFIG is a bench preset plus optional flags, quoted as one word, e.g. "tiny", "gpt2",
# "tiny --freeze-top 1", "gpt2 --batch 1". Default: tiny, tiny --freeze-top 1, gpt2,
# gpt2 --freeze-top 1. For each config the two implementations run alternately (A B A B ...,
# R times each, fresh processes) so both see the same machine load; the table gives the medians of
# the per-run medians and the ratio ablate/PyTorch (below 1: ablate is faster). Every run's JSON
# goes to FILE (default bench-out/bench-<time>.jsonl). `uptime` is printed before and after:
# on a shared machine the numbers only mean something next to the load they were taken under.
#
# Needs: target/release/ablate-worker (built here if missing) and the venv of scripts/pyenv.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
REPS=3
THREADS=2
STEPS=""
OUT=""
CONFIGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --reps) REPS="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "bench.sh: unknown flag $1 (see --help)" >&2; exit 2 ;;
    *) CONFIGS+=("$1"); shift ;;
  esac
done
if [[ ${#CONFIGS[@]} -eq 0 ]]; then
  CONFIGS=("tiny" "tiny --freeze-top 1" "gpt2" "gpt2 --freeze-top 1")
fi
VENV="${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}"
[[ -x "$VENV/bin/python" ]] || bash scripts/pyenv.sh
WORKER="${ABLATE_WORKER_BIN:-target/release/ablate-worker}"
[[ -x "$WORKER" ]] || cargo build --release -p worker
OUT="${OUT:-bench-out/bench-$(date +%Y%m%d-%H%M%S).jsonl}"
mkdir -p "$(dirname "$OUT")"
: > "$OUT"

echo "load before: $(uptime)"
for cfg in "${CONFIGS[@]}"; do
  read -r -a words <<< "$cfg"
  preset="${words[0]}"
  extra=("${words[@]:1}")
  steps="$STEPS"
  if [[ -z "$steps" ]]; then
    case "$preset" in tiny) steps=10 ;; *) steps=3 ;; esac
  fi
  common=(--preset "$preset" --threads "$THREADS" --steps "$steps" --warmup 1 "${extra[@]}")
  for ((r = 1; r <= REPS; r++)); do
    echo "[$cfg] run $r/$REPS: ablate" >&2
    a=$("$WORKER" bench --json "${common[@]}")
    echo "{\"config\": \"$cfg\", \"rep\": $r, \"result\": $a}" >> "$OUT"
    echo "[$cfg] run $r/$REPS: pytorch" >&2
    p=$("$VENV/bin/python" scripts/bench_torch.py "${common[@]}" 2>/dev/null)
    echo "{\"config\": \"$cfg\", \"rep\": $r, \"result\": $p}" >> "$OUT"
  done
done
echo "load after:  $(uptime)"
echo "runs: $OUT"

"$VENV/bin/python" - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
configs = list(dict.fromkeys(r["config"] for r in rows))
med = lambda xs: statistics.median(xs) if xs else float("nan")
print()
print("| config | params (trainable) | impl | forward s | backward s | optimizer s | step s | tokens/s | GFLOP/s | peak MiB | ablate/PyTorch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for c in configs:
    by = {}
    for r in rows:
        if r["config"] == c:
            by.setdefault(r["result"]["impl_name"], []).append(r["result"])
    steps = {k: med([x["step_s"] for x in v]) for k, v in by.items()}
    for impl in ("ablate", "pytorch"):
        v = by.get(impl, [])
        if not v:
            continue
        f = lambda key: med([x[key] for x in v])
        ratio = ""
        if impl == "ablate" and "pytorch" in steps:
            ratio = f"{steps['ablate'] / steps['pytorch']:.2f}"
        ptxt = f"{v[0]['params']/1e6:.1f} M ({v[0]['trainable_params']/1e6:.1f} M)"
        print(f"| {c} | {ptxt} | {impl} | {f('forward_s'):.4f} | {f('backward_s'):.4f} | "
              f"{f('optimizer_s'):.4f} | {f('step_s'):.4f} | {f('tokens_per_s'):.0f} | "
              f"{f('model_gflops'):.1f} | {f('peak_rss_mib'):.0f} | {ratio} |")
EOF
