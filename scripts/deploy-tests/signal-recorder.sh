#!/usr/bin/env bash
# Stand-in for ablate-worker in the Slurm script's test (scripts/deploy-tests/slurm-signals.sh):
# records its start, its arguments' --name and every SIGTERM/SIGINT in $RECORDER_DIR/<name>,
# and behaves as the real worker does on a first signal: "checkpoint" (1 s), then exit 0.
# RECORDER_CRASH=N: exit 1 after 0.2 s on each of the first N starts of each name (a crash).
set -u
name=unnamed
prev=""
for a in "$@"; do
  [ "$prev" = --name ] && name="$a"
  prev="$a"
done
log="$RECORDER_DIR/$name"
echo "start pid=$$ gpu=${CUDA_VISIBLE_DEVICES:-none} args=$*" >>"$log"
starts=$(grep -c '^start' "$log")
if [ "$starts" -le "${RECORDER_CRASH:-0}" ]; then
  sleep 0.2
  echo "crash" >>"$log"
  exit 1
fi
stop=0
trap 'echo TERM >>"$log"; stop=1' TERM
trap 'echo INT >>"$log"; stop=1' INT
while [ "$stop" = 0 ]; do
  sleep 0.1 &
  wait $! 2>/dev/null
done
# Checkpointing: a second signal arriving now is recorded too.
sleep 1 &
wait $! 2>/dev/null
sleep 0.2 &
wait $! 2>/dev/null
echo "exit 0" >>"$log"
exit 0
