"""Suite-wide settings."""

from __future__ import annotations

from hypothesis import settings

# Property tests check behaviour, never speed: no per-example deadline, which would turn a busy
# 2-core CI machine into flaky failures.
settings.register_profile("clustermap", deadline=None)
settings.load_profile("clustermap")
