"""Where a model handle's traces run: :class:`Execution` says local or NDIF, and what nnsight needs for either."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from nsteer.errors import RemoteError
from nsteer.execution.ndif import DEFAULT_TIMEOUT, NdifBackend, require_api_key

#: How many batches travel in one NDIF request: all extraction batches of an instruction up to this count share one
#: nnsight session (only per-layer sums come back), generation batches likewise.
BATCHES_PER_REQUEST = {"extraction": 64, "generation": 16}


@dataclass(frozen=True)
class Execution:
    """How traces run: locally, or on NDIF (``remote``) with a deadline of ``timeout`` seconds per request.

    ``submit_only`` posts each NDIF request and stops (the backend raises ``Submitted`` with the job id), and puts
    every batch of a call into that one request: what ``nsteer.jobs`` uses to submit without waiting.
    """

    remote: bool = False
    timeout: float = DEFAULT_TIMEOUT
    submit_only: bool = False

    def trace_kwargs(self, model: Any, model_id: str) -> dict[str, Any]:
        """Keyword arguments for nnsight's ``trace`` / ``generate`` / ``session``: none locally, the NDIF backend
        (with this execution's deadline) remotely."""
        if not self.remote:
            return {}
        key = require_api_key()
        try:
            backend = NdifBackend(
                model, model_id=model_id, timeout=self.timeout, api_key=key, submit_only=self.submit_only
            )
        except ValueError as error:  # nnsight refuses a host that is not an http(s) url
            raise RemoteError(
                f"{error}. Set NDIF_HOST (or nnsight.CONFIG.API.HOST) to NDIF's url, e.g. https://api.ndif.us."
            ) from None
        return {"backend": backend}

    def batches_per_request(self, kind: str) -> int:
        """Batches per nnsight session for ``kind`` (extraction or generation): 1 locally (fine-grained progress),
        :data:`BATCHES_PER_REQUEST` on NDIF, all of them when submitting a job."""
        if not self.remote:
            return 1
        if self.submit_only:
            return 1 << 30  # a submitted job is one request
        return BATCHES_PER_REQUEST[kind]

    def submitting(self) -> Execution:
        """This NDIF execution, posting each request as a job instead of waiting for it."""
        if not self.remote:
            raise RemoteError("Only models opened with remote=True (backend: ndif) can be submitted as NDIF jobs.")
        return dataclasses.replace(self, submit_only=True)


LOCAL = Execution()
