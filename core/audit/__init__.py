"""Audit log: hash-chained JSON lines of every state change that matters, and its verifier.

Every line is one JSON object with sorted keys and the envelope

* ``schema`` – :data:`SCHEMA_VERSION`;
* ``seq`` – 0, 1, 2 ... per log;
* ``vm`` – the VM id;
* ``event`` – the name (:mod:`pagetrack.audit.events`);
* ``level`` – ``debug`` < ``info`` < ``warning`` < ``error``;
* ``ts`` – UTC ISO time;
* ``prev`` – hex sha256 of the previous line's bytes (64 zeros first),

plus the event's fields.  :meth:`AuditLog.close` appends the ``log_end``
trailer; :func:`verify` (``pagetrack audit LOG``) checks the chain and replays
the page-track invariants.
"""

from __future__ import annotations

from . import events
from ._log import GENESIS, SCHEMA_VERSION, AuditLog
from .verify import AuditReport, Problem, verify

__all__ = [
    "GENESIS",
    "SCHEMA_VERSION",
    "AuditLog",
    "AuditReport",
    "Problem",
    "events",
    "verify",
]
