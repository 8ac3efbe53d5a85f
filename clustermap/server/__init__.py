"""cm-server: the registry every sidecar subscribes to.

Layers, bottom up: ``store`` (revisions, change log) → ``registry`` (leases, probes' verdicts,
overrides, self-preservation, warm-up; thread-safe) → ``servicers`` (gRPC edge: validation,
encoding) → ``main`` (command line, lifecycle). See docs/server.md. Importing this package
imports nothing heavy; ``clustermap.server.main:main`` is the ``cm-server`` entry point.
"""

__all__: list[str] = []
