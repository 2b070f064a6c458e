# shellcheck shell=bash
# What the shell suites share (tests/appliance/run.sh, tests/ansible/run.sh,
# tests/lab/run.sh and tests/lab/lab.sh): counting checks, headings, waiting,
# and stopping the processes a suite started. Sourced; a second source is a
# no-op, so a library that needs these can source it too.
#
#   pass DESCRIPTION [WHY]         count one check as passed, print it
#   fail DESCRIPTION [WHY]         count one check as failed, print it (and WHY)
#   check DESCRIPTION COMMAND...   passed when COMMAND exits 0. It runs in a
#                                  subshell with its output captured: all of it
#                                  goes to $CHECKS_LOG, its last 20 lines are
#                                  shown when it fails
#   need DESCRIPTION COMMAND...    a check the rest cannot go on without: the
#                                  suite finishes when it fails
#   need_here DESCRIPTION COMMAND...
#                                  like need, but COMMAND runs in this shell (it
#                                  may set variables) and its output is shown
#                                  as it comes
#   not COMMAND...                 succeeds when COMMAND fails
#   step TITLE                     a heading with the seconds since the start
#   wait_for SECS COMMAND...       runs COMMAND (quietly) every
#                                  $CHECKS_POLL_SECS until it succeeds; fails
#                                  when SECS have passed
#   free_port                      prints a free TCP port on 127.0.0.1
#   stop_pids PID...               SIGTERM to each, then waits for each
#   finish                         the summary, then exit: 0 when no check failed
#
# finish ends with the line "N passed, M failed" that tests/run-all.sh adds
# up across suites; nothing else here prints a line of that shape.
#
# Settings, read when used:
#   CHECKS_LOG        file that collects every check's output (default: none)
#   CHECKS_NOTE       said in the summary after the time taken (e.g. "Logs: DIR")
#   CHECKS_POLL_SECS  wait_for's interval (default 1)

[ -z "${CHECKS_SH_LOADED:-}" ] || return 0
CHECKS_SH_LOADED=1

CHECKS_STARTED=${CHECKS_STARTED:-$(date +%s)}
CHECKS_PASSED=0
CHECKS_FAILED=0
CHECKS_FAILURES=()

pass() {
    CHECKS_PASSED=$((CHECKS_PASSED + 1))
    echo "PASS: $1"
}

fail() {
    CHECKS_FAILED=$((CHECKS_FAILED + 1))
    CHECKS_FAILURES+=("$1")
    echo "FAIL: $1${2:+ ($2)}"
}

check() {
    local description=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$description"
    else
        fail "$description"
        [ -z "$out" ] || printf '%s\n' "$out" | tail -n 20 | sed 's/^/    /'
    fi
    printf '== %s\n%s\n' "$description" "$out" >>"${CHECKS_LOG:-/dev/null}"
}

need() {
    local before=$CHECKS_FAILED
    check "$@"
    [ "$CHECKS_FAILED" -eq "$before" ] || {
        echo "cannot go on without: $1"
        finish
    }
}

need_here() {
    local description=$1
    shift
    if "$@"; then
        pass "$description"
    else
        fail "$description"
        echo "cannot go on without: $description"
        finish
    fi
}

not() { ! "$@"; }

checks_elapsed() { echo $(($(date +%s) - CHECKS_STARTED)); }

step() {
    echo
    echo "=== $* ($(checks_elapsed) s)"
}

wait_for() {
    local deadline=$(($(date +%s) + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep "${CHECKS_POLL_SECS:-1}"
    done
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pids() {
    local pid
    for pid in "$@"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "$@"; do
        wait "$pid" 2>/dev/null || true
    done
}

finish() {
    echo
    if [ "$CHECKS_FAILED" -gt 0 ]; then
        echo "Failed checks:"
        printf '  - %s\n' "${CHECKS_FAILURES[@]}"
    fi
    echo "Took $(checks_elapsed) s.${CHECKS_NOTE:+ $CHECKS_NOTE}"
    echo "$CHECKS_PASSED passed, $CHECKS_FAILED failed"
    [ "$CHECKS_FAILED" -eq 0 ]
    exit $?
}
