#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs the test suite. Extra arguments go to pytest.
# --cov (first argument), or PARNET_COVERAGE=1: the suite runs under coverage.py, counting the
# server daemons, their workers and pool processes too ([tool.coverage] in pyproject.toml), and
# ends with the line coverage report (fails below fail_under). PARNET_COVERAGE=figure: the
# same, but only the figure decides the exit status (CI: pass/fail is its run without coverage).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
cov=${PARNET_COVERAGE:-0}
if [ "${1:-}" = "--cov" ]; then
    cov=1
    shift
fi
if [ "$cov" = "1" ] || [ "$cov" = "figure" ]; then
    export COVERAGE_FILE="$PWD/.coverage"
    rm -f .coverage .coverage.*
    status=0
    .venv/bin/python -m coverage run -m pytest "$@" || status=$?
    if [ "$cov" = "figure" ]; then
        echo "(tests under coverage exited with $status; only the coverage figure counts here)"
        status=0
    fi
    .venv/bin/python -m coverage combine -q
    if ! .venv/bin/python -m coverage report --precision=1 --sort=cover && [ "$status" = 0 ]; then
        status=2  # below fail_under
    fi
    exit "$status"
fi
exec .venv/bin/python -m pytest "$@"
