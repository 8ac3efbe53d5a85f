"""gunicorn settings for an app that calls ``clustermap.pick``: ``gunicorn -c gunicorn.conf.py``.

ClusterMap needs no server hook: the client resets itself after a fork (``os.register_at_fork``),
is thread- and greenlet-safe and never blocks, so every worker class works, with or without
``preload_app``. What matters is that ``CLUSTERMAP_REGION`` names the file this machine's
``cm-sidecar`` publishes (both default to ``/dev/shm/clustermap/default.region``).

Every value can be overridden on the command line (``-w 8 -k gthread``), through
``GUNICORN_CMD_ARGS``, or through the environment variables read below.
"""

import os

# The WSGI callable: ``example_app.app``, next to this file. Point these at your own app.
pythonpath = os.path.dirname(os.path.abspath(__file__))
wsgi_app = "example_app:app"
bind = os.environ.get("BIND", "127.0.0.1:8000")

# Any worker class: sync, gthread (threads > 1), gevent. pick() does no I/O and takes no lock a
# greenlet could wait on, so it cannot stall an event loop.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "sync")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))

# Safe either way. With preload the master imports clustermap and the app once, before forking;
# the region is mapped on the first pick, and each worker draws its own round-robin start after
# the fork, so workers forked together do not all send their first request to one backend.
preload_app = os.environ.get("GUNICORN_PRELOAD", "true").lower() in ("1", "true", "yes")

# The region the workers read. An explicit CLUSTERMAP_REGION in the environment wins.
region = os.environ.get("CLUSTERMAP_REGION", "/dev/shm/clustermap/default.region")
raw_env = [f"CLUSTERMAP_REGION={region}"]

# A worker that dies (SIGKILL, OOM killer) is replaced by the master and maps the region on its
# first pick. Nothing to clean up: workers only read the region and hold no lock in it.
timeout = 30
graceful_timeout = 10
