#!/usr/bin/env bash
# Every test the README promises: unit, trainer (real 4-bit on the CPU), integration and e2e
# (on the real local control plane). gpu tests are skipped here and reported as skipped.
#
# Called with no arguments (as `make test` does), it runs two pytest processes side by side:
# tests/trainer (CPU-bound, no cluster) in the background at a lower priority, its output in
# build/pytest-trainer.log, and everything else in the foreground, which mostly waits on the
# cluster's pods (a third of this 2-core machine's CPU idle). The trainer log is printed once the
# foreground run ends; the exit code is the first failure of the two (0 only if both passed).
# Options for both go through PYTEST_ADDOPTS (CI: `--durations=30`). With any argument (a path,
# `-m unit`, `-k ...`) it is one pytest process over exactly what was asked, as before;
# KUBETUNE_PYTEST_SPLIT=0 makes the no-argument run one process too.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1

if [[ $# -gt 0 || "${KUBETUNE_PYTEST_SPLIT:-1}" == 0 ]]; then
  exec .venv/bin/pytest "$@"
fi

mkdir -p build
trainer_log=build/pytest-trainer.log
# nice: the cluster suites' deadline-based waits come first. One torch thread (tests/trainer's
# conftest sets it too): on 2 cores more threads only contend with the other process.
# setsid: a process group of its own, so that stopping it stops the training processes it started.
OMP_NUM_THREADS=1 setsid nice -n 10 .venv/bin/pytest tests/trainer >"$trainer_log" 2>&1 &
trainer_pid=$!
stop_trainer() { kill -TERM -- "-${trainer_pid}" 2>/dev/null || true; }
# Interrupted or killed: the background run doesn't outlive the script.
trap stop_trainer EXIT

echo "==> tests/trainer runs beside the rest (its output: ${trainer_log}, printed at the end)"
main_rc=0
.venv/bin/pytest --ignore=tests/trainer || main_rc=$?
# 2: pytest was interrupted (Ctrl-C); the background run, which ignores SIGINT, stops with it.
[[ $main_rc == 2 ]] && stop_trainer
trainer_rc=0
wait "$trainer_pid" || trainer_rc=$?
trap - EXIT

echo
echo "==> tests/trainer (ran beside the rest; exit code ${trainer_rc})"
cat "$trainer_log"
echo "==> exit codes: tests/trainer ${trainer_rc}, the rest ${main_rc} (the two summaries above)"

# 5 is pytest's "no tests collected": not a failure when PYTEST_ADDOPTS deselects one side only.
if [[ $main_rc != 0 && $main_rc != 5 ]]; then
  exit "$main_rc"
elif [[ $trainer_rc != 0 && $trainer_rc != 5 ]]; then
  exit "$trainer_rc"
elif [[ $main_rc == 5 && $trainer_rc == 5 ]]; then
  exit 5
fi
exit 0
