"""Docker HEALTHCHECK: exit 0 when the app answers ``GET /health`` on PORT (200, or 401 with basic auth on).

A TCP accept is not enough: gunicorn accepts connections even when every worker thread is busy.

    python -m backend.healthcheck
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('PORT', '9090')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        return 0 if exc.code == 401 else 1
    except OSError as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
