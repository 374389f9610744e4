# Steps under one time budget, results kept as they come: sourced by bench/gpu_suite.sh.
#
#   suite_start RESULTS_DIR [RETURN_DIR]     then     step NAME SHARE COMMAND...   ...   suite_end
#
# Every step gets SHARE % of (BUDGET - RESERVE) seconds (100: whatever is left), never more than
# is left, so the suite ends within BUDGET by construction: a step runs under `timeout LIMIT`, is
# interrupted at LIMIT and killed GRACE seconds later, and the limit is taken from the time left
# less GRACE and RESERVE (the report and the archive at the end).  A step left with less than
# MIN_STEP seconds is skipped.  A failing or timed-out step is recorded and the next one runs.
#
# RESULTS_DIR gets each step's log (<step>.log) and whatever the step writes there, and suite.log,
# one line per step.  RETURN_DIR, when given, is kept to three files however many steps run (a
# device tool returns a few files only): suite.log, the running step's log (current.log, written
# live) and gpu-suite.tgz, an archive of RESULTS_DIR renewed after every step, so a run killed
# outright still returns the steps it finished.  SIGTERM or SIGINT stops the running step, records
# it as KILLED and archives before exiting.
#
# Settings (environment): BUDGET RESERVE GRACE MIN_STEP (seconds), STEPS (comma-separated names
# to run; default all), SKIPPED_FAILS (1: a step skipped for want of time fails the suite).

suite_start() {
  RES=$1
  RETURN=${2:-}
  export RES
  mkdir -p "$RES" || exit 1
  [[ -n $RETURN ]] && { mkdir -p "$RETURN" || exit 1; }
  : > "$RES/suite.log"
  START=$SECONDS
  STEP_PID= CURRENT=
  trap 'suite_abort TERM 143' TERM
  trap 'suite_abort INT 130' INT
  say "== suite: budget ${BUDGET} s (${RESERVE} s kept for the end, ${GRACE} s grace per step), results in $RES"
}

say() {  # one line to stdout and suite.log (and its copy in RETURN)
  echo "$*" | tee -a "$RES/suite.log"
  [[ -n $RETURN ]] && cp "$RES/suite.log" "$RETURN/suite.log"
  return 0
}

elapsed() { echo $((SECONDS - START)); }

step_limit() {  # step_limit SHARE AT -> seconds a step starting AT s into the suite may take (may be < MIN_STEP)
  local share=$1 at=$2 left cap
  left=$((BUDGET - RESERVE - GRACE - at))
  cap=$(((BUDGET - RESERVE) * share / 100))
  echo $((cap < left ? cap : left))
}

selected() { [[ -z ${STEPS:-} || ",$STEPS," == *",$1,"* ]]; }

step() {  # step NAME SHARE COMMAND...
  local name=$1 share=$2 at limit code verdict log
  shift 2
  selected "$name" || { say "== $name: not in STEPS"; return 0; }
  at=$(elapsed)
  limit=$(step_limit "$share" "$at")
  if ((limit < MIN_STEP)); then
    say "== $name: SKIPPED, ${limit} s left for it (under ${MIN_STEP} s) at $at s"
    return 0
  fi
  say "== $name (limit ${limit} s) at $at s: $*"
  log=$RES/$name.log
  [[ -n $RETURN ]] && log=$RETURN/current.log
  CURRENT=$name STEP_T0=$SECONDS
  if declare -F "$1" > /dev/null; then  # a shell function: timeout runs programs, so hand it to bash
    set -- bash -c "$(declare -f)"$'\n''"$@"' "$name" "$@"  # with every function, for those it calls
  fi
  timeout --signal=INT --kill-after="$GRACE" "$limit" "$@" > "$log" 2>&1 < /dev/null &
  STEP_PID=$!
  wait "$STEP_PID"
  code=$?
  STEP_PID=
  verdict="FAILED (exit $code)"
  ((code == 0)) && verdict=passed
  ((code == 124 || code == 137)) && verdict="TIMED OUT (limit ${limit} s)"
  step_done "$name" "$verdict"
}

step_done() {  # the step's log into RESULTS_DIR, its line in suite.log, the archive renewed
  local name=$1 verdict=$2
  if [[ -n $RETURN && -f $RETURN/current.log ]]; then
    mv -f "$RETURN/current.log" "$RES/$name.log"
  fi
  say "== $name: $verdict in $((SECONDS - STEP_T0)) s, at $(elapsed) s"
  tail -n 3 "$RES/$name.log" | sed 's/^/   | /'
  CURRENT=
  archive
}

note() {  # note NAME TEXT: a step that is not run, and why
  say "== $1: $2"
}

archive() {  # RESULTS_DIR as RETURN/gpu-suite.tgz, replaced whole (never half-written)
  [[ -n $RETURN ]] || return 0
  tar czf "$RETURN/gpu-suite.tgz.part" -C "$(dirname "$RES")" "$(basename "$RES")" \
    && mv -f "$RETURN/gpu-suite.tgz.part" "$RETURN/gpu-suite.tgz"
}

suite_abort() {  # on SIGTERM / SIGINT: stop the running step, keep what it wrote, archive, exit
  local signal=$1 status=$2
  trap '' TERM INT
  if [[ -n $STEP_PID ]]; then
    kill -TERM "$STEP_PID" 2> /dev/null  # timeout passes it on to the step's process group
    wait "$STEP_PID" 2> /dev/null        # at most GRACE seconds: then timeout kills them
    step_done "$CURRENT" "KILLED (the suite got SIG$signal)"
  fi
  say "== suite: stopped by SIG$signal at $(elapsed) s"
  archive
  exit "$status"
}

suite_end() {  # the last line: how many steps passed (with SKIPPED_FAILS=1 a step skipped for time fails)
  local passed failed
  passed=$(grep -cE '^== [a-z0-9-]+: passed' "$RES/suite.log")
  failed=$(grep -cE "^== [a-z0-9-]+: (FAILED|TIMED OUT|KILLED${SKIPPED_FAILS:+|SKIPPED})" "$RES/suite.log")
  say "== suite: done at $(elapsed) s of ${BUDGET}: ${passed} passed, ${failed} failed or timed out"
  archive
  trap - TERM INT
  ((failed == 0))
}
