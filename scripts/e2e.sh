#!/usr/bin/env bash
# Runs the end-to-end tests against a real Label Studio 1.23.2 (tests/e2e, marker "labelstudio").
# Label Studio is installed into .venv-labelstudio/ on first use; logs and screenshots go to
# artifacts/e2e/. Extra arguments go to pytest, e.g. scripts/e2e.sh -k browser.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure_venv.sh test
if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet playwright  # the browser is Debian's chromium, never `playwright install`
fi
exec nice .venv/bin/python -m pytest -q -m labelstudio tests/e2e "$@"
