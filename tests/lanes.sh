#!/usr/bin/env bash
# `make test`: the whole suite in two pytest processes side by side, each pinned to its half of the CPU cores.
#   notebooks lane: the notebooks and their solutions, in order (05 reads 04's runs, 06 05's, 07 and 11 06's)
#   tests lane:     tests/, and notebooks 08 and 09, which read no runs
# Why: one pytest process left a core idle about a quarter of the time (pip building the side venvs, servers
# starting, imports, single-threaded Python): 37 min 16 s in one lane, 26 min 22 s in two (benchmarks/RESULTS.md,
# session 19). Pinned, because two lanes on the same cores make a 2-thread training step wait at every parallel
# region for its thread that the other lane preempted. Each launch sizes its threads to its lane's cores (`nproc`,
# torch and run_zero2.sh follow the affinity): on 2 cores every training run in `make test` uses 1 thread, where a
# learner's notebook uses 2 (the same recipe, another draw: notebook 06 scores 94.7% here, 91.3% on 2 threads).
# With one core there is one lane. The tests lane prints as it goes; the notebooks lane writes a log, printed (and
# then followed) after.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"  # the notebooks lane does not load tests/conftest.py, which sets it

# Both lanes need the tiny world: build it (or find it in the cache) once, first, on every core.
python -m course_lib.tiny_world >/dev/null || exit 1

alone=(notebooks/08_speed.ipynb notebooks/09_design_patterns.ipynb)
mapfile -t cpus < <(python -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")')
half=$(( ${#cpus[@]} / 2 ))
if (( half == 0 )); then
  exec pytest -q tests notebooks --nbmake --nbmake-timeout=3600
fi
join() { local IFS=,; echo "$*"; }
notebook_cpus="$(join "${cpus[@]:0:half}")"
tests_cpus="$(join "${cpus[@]:half}")"

log="$(mktemp -t course-notebooks-lane.XXXXXX.log)"
echo "notebooks lane on CPUs $notebook_cpus (log: $log); tests lane on CPUs $tests_cpus"
taskset -c "$notebook_cpus" pytest -q notebooks --nbmake --nbmake-timeout=3600 "${alone[@]/#/--ignore=}" \
  >"$log" 2>&1 &
notebooks=$!
trap 'kill "$notebooks" 2>/dev/null' INT TERM

taskset -c "$tests_cpus" pytest -q tests "${alone[@]}" --nbmake --nbmake-timeout=3600
tests_rc=$?
echo
echo "== notebooks lane (log: $log)"
tail -n +1 -f --pid="$notebooks" "$log"
wait "$notebooks"
notebooks_rc=$?
echo "== tests lane: exit code $tests_rc; notebooks lane: exit code $notebooks_rc"
(( tests_rc == 0 && notebooks_rc == 0 ))
