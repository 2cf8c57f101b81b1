#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs `parnet demo`: two TLS servers on this machine, a real map.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/parnet demo "$@"
