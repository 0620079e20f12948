#!/usr/bin/env bash
# Runs the test suite in .venv (created and filled on first use). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure_venv.sh test
exec .venv/bin/python -m pytest -q "$@"
