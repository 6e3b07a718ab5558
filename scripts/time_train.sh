#!/usr/bin/env bash
# Wall time of `firm train` on the embedded defaults for several checkouts or settings, back to
# back on this machine (a before/after pair is only comparable when run like this: the host's
# speed drifts from hour to hour). Each argument is LABEL=SRC_DIR [extra train flags]:
#
#   git worktree add ../firm-before face29d
#   scripts/time_train.sh after=src before=../firm-before/src 'last-hidden=src --gram last-hidden'
#
# Prints one line per run (exit code, whole-process seconds, firm's own wall time, load average)
# and keeps the run directories and logs in a temporary folder.
set -u
python=${PYTHON:-.venv/bin/python}
out=$(mktemp -d -t firm-time-train-XXXX)
index=0
for spec in "$@"; do
  index=$((index + 1))
  label=${spec%%=*}
  rest=${spec#*=}
  src=${rest%% *}
  extra=""
  [[ "$rest" == *" "* ]] && extra=${rest#* }
  start=$(date +%s)
  # shellcheck disable=SC2086  # the extra flags are meant to split
  PYTHONPATH=$src $python -m firm.cli train --run-dir "$out/$index-$label" $extra > "$out/$index-$label.log" 2>&1
  rc=$?
  printf '%s\trc %s\tprocess %s s\t%s\tload %s\n' "$label" "$rc" "$(( $(date +%s) - start ))" \
    "$(grep -o 'wall time [0-9]* s' "$out/$index-$label.log" || echo 'no wall time (see the log)')" \
    "$(cut -d' ' -f1 /proc/loadavg)"
done
echo "run directories and logs: $out"
