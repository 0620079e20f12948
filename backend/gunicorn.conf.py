"""gunicorn settings, all from the same environment variables as the app (see the README).

The model is never loaded in the master: ``preload_app`` stays off and each worker loads
the checkpoint after forking (``post_worker_init``), so CUDA is only ever initialised in
the process that uses it. A checkpoint that fails to load stops the worker at boot.
"""
from gunicorn.workers import gthread

from backend.config import Settings
from backend.logging_setup import JsonFormatter

_settings = Settings.from_env()


class _ReadTimeoutConnection(gthread.TConn):
    """A connection whose reads and writes time out after REQUEST_READ_TIMEOUT seconds of silence.

    gthread waits for a request's first bytes without holding a thread, but then reads the rest
    with a blocking socket and no timeout: a few clients that stop mid-request (headers or a body
    that never ends, a TLS ClientHello on the plain port) would hold every thread, and /health
    with them. gthread calls ``init`` on every request of a connection, after making the socket
    blocking, so the timeout is set again each time.
    """

    def init(self):
        super().init()
        self.sock.settimeout(_settings.request_read_timeout)


gthread.TConn = _ReadTimeoutConnection  # gthread's worker builds its connections from this name

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
worker_class = "gthread"
preload_app = False
timeout = 300  # the first click on a large image downloads and encodes it on CPU
graceful_timeout = 30
loglevel = _settings.log_level.lower()
accesslog = None  # the app logs every request itself (method, path, status, ms) as JSON
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": JsonFormatter}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "root": {"level": _settings.log_level, "handlers": []},  # the app adds its JSON handler (configure_logging)
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": _settings.log_level, "propagate": False},
    },
}


def post_worker_init(worker):
    """Load the model in the freshly forked worker, before it serves a request."""
    worker.wsgi.extensions["clickseg"].ensure_loaded()
control_socket_disable = True  # gunicorn's per-user control socket clashes when two backends share a host
