#!/usr/bin/env bash
# deploy/slurm/ablate-worker.sbatch without Slurm: runs the batch script as slurmstepd would (its
# own process group, SLURM_* and CUDA_VISIBLE_DEVICES set) with a stand-in worker that records
# the signals it gets (signal-recorder.sh), and plays what Slurm does:
#   1. the early warning: SIGUSR1 to the batch shell only (--signal=B:USR1@120);
#   2. scancel / preemption / the time limit: SIGTERM to every process of the job;
#   3. a worker that crashes is started again.
# Each worker must see exactly one SIGTERM and exit 0, and the batch script must exit 0.
#   slurm-signals.sh WORK REPO
set -uo pipefail
work="$1" repo="$2"
fails=0
fail() {
  echo "FAIL: $*"
  fails=$((fails + 1))
}

conf="$work/slurm-conf"
mkdir -p "$conf" "$work/slurm-bin"
cp "$work/worker.token" "$conf/worker.token"
chmod 600 "$conf/worker.token"
install -m 0755 "$repo/scripts/deploy-tests/signal-recorder.sh" "$work/slurm-bin/ablate-worker"

# run_job NAME [ENV=VALUE...]: start the batch script in its own session; sets $job_pid.
run_job() {
  local name="$1"
  shift
  rec="$work/rec-$name"
  rm -rf "$rec"
  mkdir -p "$rec"
  env "$@" RECORDER_DIR="$rec" ABLATE_COORDINATOR=https://coord.example:7070 ABLATE_CONF="$conf" \
    ABLATE_WORKER_BIN="$work/slurm-bin/ablate-worker" ABLATE_CACHE="$work/slurm-cache" \
    TMPDIR="$work" SLURM_JOB_ID=4242 SLURMD_NODENAME=node7 CUDA_VISIBLE_DEVICES=0,1 \
    setsid bash "$repo/deploy/slurm/ablate-worker.sbatch" >"$work/job-$name.out" 2>&1 &
  job_pid=$!
}

# wait_for COUNT: until COUNT workers have started (and not crashed since).
wait_started() {
  local want="$1"
  for _ in $(seq 1 100); do
    [ "$(cat "$rec"/* 2>/dev/null | grep -c '^start')" -ge "$want" ] && { sleep 0.5; return 0; }
    sleep 0.1
  done
  fail "$want worker starts not seen: $(cat "$rec"/* 2>/dev/null)"
}

# job_exit: wait for the batch script; its exit status in $rc.
job_exit() {
  rc=0
  for _ in $(seq 1 100); do
    kill -0 "$job_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$job_pid" 2>/dev/null; then
    fail "the batch script did not exit"
    kill -KILL -- "-$job_pid" 2>/dev/null
  fi
  wait "$job_pid" || rc=$?
}

expect_one_term() {
  local n
  for w in node7-job4242-gpu0 node7-job4242-gpu1; do
    [ -f "$rec/$w" ] || { fail "$1: no worker $w"; continue; }
    n=$(grep -c '^TERM' "$rec/$w")
    [ "$n" = 1 ] || fail "$1: worker $w got $n SIGTERMs: $(tr '\n' ';' <"$rec/$w")"
    grep -q '^exit 0' "$rec/$w" || fail "$1: worker $w did not finish its checkpoint: $(tr '\n' ';' <"$rec/$w")"
  done
}

echo "-- 1. early warning: SIGUSR1 to the batch shell"
run_job warning
wait_started 2
grep -q 'gpu=0 args=--device cuda:0 --name node7-job4242-gpu0 --work-dir' "$rec/node7-job4242-gpu0" ||
  fail "worker 0 not started on GPU 0 with --device cuda:0: $(cat "$rec/node7-job4242-gpu0")"
grep -q -- "--token-file $conf/worker.token" "$rec/node7-job4242-gpu1" || fail "no --token-file for worker 1"
kill -USR1 "$job_pid"
job_exit
[ "$rc" = 0 ] || fail "warning: the batch script exited $rc: $(cat "$work/job-warning.out")"
expect_one_term warning

echo "-- 2. job kill: SIGTERM to every process of the job (scancel, preemption, time limit)"
run_job kill
wait_started 2
kill -TERM -- "-$job_pid"
job_exit
[ "$rc" = 0 ] || fail "kill: the batch script exited $rc: $(cat "$work/job-kill.out")"
expect_one_term kill

echo "-- 3. a crash: the worker is started again, then the warning stops both"
run_job crash RECORDER_CRASH=1
wait_started 4
for w in node7-job4242-gpu0 node7-job4242-gpu1; do
  [ "$(grep -c '^start' "$rec/$w")" = 2 ] || fail "crash: worker $w not restarted once: $(tr '\n' ';' <"$rec/$w")"
done
kill -USR1 "$job_pid"
job_exit
[ "$rc" = 0 ] || fail "crash: the batch script exited $rc"
expect_one_term crash
grep -q 'exited (status 1); starting it again' "$work/job-crash.out" || fail "crash: no restart message"

cat "$work"/job-*.out | sed 's/^/   | /'
exit "$fails"
