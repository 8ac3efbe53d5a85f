"""What the sidecar makes of a server's answer or error, whether it came by poll or by stream.

Shared by :mod:`clustermap.sidecar.poller` and :mod:`clustermap.sidecar.watcher` so that both
paths set aside the same services and describe a failed call in the same words.
"""

from __future__ import annotations

from dataclasses import replace

import grpc

from clustermap.checksum import service_digest
from clustermap.sidecar.validate import invalid_services
from clustermap.wire import PollAnswer, Rejected

__all__ = ["rpc_error", "set_aside_invalid"]


def set_aside_invalid(answer: PollAnswer) -> PollAnswer:
    """Move the services the registry could never have accepted to ``answer.rejected``: the
    sidecar keeps their last good nodes and takes the rest of the answer."""
    bad = invalid_services(answer.services)
    if not bad:
        return answer
    return replace(
        answer,
        services=tuple(s for s in answer.services if s.name not in bad),
        rejected=(
            *answer.rejected,
            *(
                Rejected(s.name, answer.digests.get(s.name, service_digest(s)), bad[s.name])
                for s in answer.services
                if s.name in bad
            ),
        ),
    )


def rpc_error(exc: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, for logs and ``cmctl status``."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "ERROR"
    return f"{name}: {details}" if details else name
