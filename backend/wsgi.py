"""WSGI entry point: ``gunicorn -c backend/gunicorn.conf.py backend.wsgi:app``.

Creating the app reads the settings but does not load the model; gunicorn's
``post_worker_init`` hook loads it in each worker, after the fork.
"""
from .app import create_app

app = create_app()
