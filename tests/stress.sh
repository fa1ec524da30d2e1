#!/usr/bin/env bash
# `make stress-test`: the whole suite many times in a row, then under load.
#
# A suite that passes once proves little about races and timing bounds. This
# runs it STRESS_RUNS times on its own (default 10), then STRESS_LOADED times
# (default 3) with, beside it, another procshare program looping (the demo,
# which works in a namespace of its own) and one CPU hog per core (`nproc`).
# It prints one line per run, keeps each run's output under build/stress/,
# stops everything it started (even on failure or Ctrl-C) and exits 1 if any
# run failed, or if the demo beside the suite ever went wrong.
#
#   STRESS_RUNS=10 STRESS_LOADED=3 tests/stress.sh [extra pytest arguments]
#
# PY is the interpreter (the Makefile passes the venv's); extra arguments go
# to every pytest run (e.g. `-k locks` while working on one area).
set -u

PY=${PY:-.venv/bin/python}
RUNS=${STRESS_RUNS:-10}
LOADED=${STRESS_LOADED:-3}
LOGS=${STRESS_LOGS:-build/stress}
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/stop
TOTAL=$((RUNS + LOADED))
STOP="$LOGS/stop"
# Run "$@" with SIGINT at its default even if this script was started with it
# ignored (nohup, `&`): the demo must stop cleanly on the Ctrl-C sent to it,
# and the suite's Ctrl-C tests run as they would from a terminal.
with_sigint() {
    "$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execvp(sys.argv[1], sys.argv[1:])' "$@"
}

demo_pid=""
hog_pids=()

stop_load() {
    # The hogs are killed; the demo loop sees the stop file and the demo gets a
    # Ctrl-C (it stops its children and cleans its namespace), then SIGKILL if
    # it is still there after 30 s. Each job has a process group of its own.
    for pid in "${hog_pids[@]}"; do
        kill -KILL -- "-$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    hog_pids=()
    [ -z "$demo_pid" ] && return
    touch "$STOP"
    kill -INT -- "-$demo_pid" 2>/dev/null
    for _ in $(seq 300); do
        kill -0 -- "-$demo_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL -- "-$demo_pid" 2>/dev/null
    wait 2>/dev/null
    demo_pid=""
}
trap 'stop_load' EXIT
trap 'echo "interrupted"; exit 130' INT TERM

start_load() {
    set -m # every background job in a process group of its own, to stop it whole
    rm -f "$STOP"
    (
        while [ ! -e "$STOP" ]; do
            PROCSHARE_NAMESPACE="beside-$$" with_sigint "$PY" -m procshare demo --repeat 5
            echo "demo exit $?"
        done
    ) >"$LOGS/demo-beside.log" 2>&1 &
    demo_pid=$!
    for _ in $(seq "$(nproc)"); do
        (while :; do :; done) &
        hog_pids+=($!)
    done
    set +m
}

failed=0
run_suite() { # $1: run number, $2: "quiet" or "loaded"
    local log start took rc summary
    log=$(printf '%s/run-%02d-%s.log' "$LOGS" "$1" "$2")
    start=$(date +%s)
    with_sigint "$PY" -m pytest -q -p no:cacheprovider "${@:3}" >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    summary=$(grep -E '^=* ?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s' "$log" | tail -1)
    summary=${summary//=/}
    if [ $rc -eq 0 ]; then
        printf 'run %2d of %d (%s): ok     %4ds  %s\n' "$1" "$TOTAL" "$2" "$took" "${summary# }"
    else
        failed=$((failed + 1))
        printf 'run %2d of %d (%s): FAILED %4ds  %s  (%s)\n' "$1" "$TOTAL" "$2" "$took" \
            "${summary# }" "$log"
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/        /'
    fi
}

echo "stress test: $RUNS quiet run(s), then $LOADED loaded run(s) ($(nproc) CPU hog(s) and" \
    "the demo looping beside the suite); logs in $LOGS/"
n=0
for _ in $(seq "$RUNS"); do
    n=$((n + 1))
    run_suite "$n" quiet "$@"
done
if [ "$LOADED" -gt 0 ]; then
    start_load
    for _ in $(seq "$LOADED"); do
        n=$((n + 1))
        run_suite "$n" loaded "$@"
    done
    stop_load
    demo_ok=$(grep -c '^demo exit 0$' "$LOGS/demo-beside.log")
    demo_bad=$(grep -E '^demo exit [0-9]+$' "$LOGS/demo-beside.log" | grep -vc '^demo exit 0$')
    # The last demo was stopped by the Ctrl-C above: exit 130 is expected there.
    if [ "$(grep -E '^demo exit' "$LOGS/demo-beside.log" | tail -1)" = "demo exit 130" ]; then
        demo_bad=$((demo_bad - 1))
    fi
    echo "demo beside the suite: $demo_ok run(s) of 5 repeats ok, $demo_bad failed" \
        "($LOGS/demo-beside.log)"
    [ "$demo_bad" -gt 0 ] && failed=$((failed + 1))
fi
if [ $failed -eq 0 ]; then
    echo "stress test: all $TOTAL run(s) passed"
else
    echo "stress test: $failed of $TOTAL run(s) FAILED"
    exit 1
fi
