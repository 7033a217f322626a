"""How a trace runs: locally through nnsight, or on NDIF with nsteer's deadline, error messages and result loading.

Extraction and generation write one trace body and hand ``ModelHandle.trace_kwargs()`` to nnsight; what that adds
(nothing locally, an NDIF backend remotely) is decided here, by the handle's :class:`backend.Execution`. Other
nnsight backends plug in at the same place.
"""
