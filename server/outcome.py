"""How a federation ends early; raised by the ServerApp, read by what announces the end."""
from __future__ import annotations


class FederationStopped(RuntimeError):
    """The run ended early (no quorum); the last checkpoint is intact and resumable."""


class FederationFailed(RuntimeError):
    """A round produced no finite model (every update rejected or failed, or a non-finite
    aggregate): status "failed", the last good checkpoint is kept, never overwritten."""
