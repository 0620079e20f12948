#!/usr/bin/env bash
# Starts the Label Studio ML backend on the embedded default model, creating .venv at the
# repository root and installing the project on first use. Settings are environment
# variables (see the README), e.g.
#   PORT=9090 LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=... ./scripts/serve.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure_venv.sh
exec .venv/bin/gunicorn -c backend/gunicorn.conf.py backend.wsgi:app
