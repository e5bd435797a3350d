"""``needs_kvm``: skip a test, with the reason, where /dev/kvm is absent or unusable."""

from __future__ import annotations

import os

import pytest


def _kvm_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent"
    try:
        from pagetrack.kvm import detect_execution

        detect_execution()
    except Exception as exc:  # KvmUnavailable or a broken host
        return f"/dev/kvm is not usable: {exc}"
    return None


KVM_PROBLEM = _kvm_problem()
needs_kvm = pytest.mark.skipif(KVM_PROBLEM is not None, reason=KVM_PROBLEM or "")
