"""Real-KVM backend: run guest programs of the ABI on /dev/kvm with dirty logging.

Standard library only (ctypes ioctls, mmap).  Entry point: :func:`run_on_kvm`.
"""

from .run import EXECUTION_MODES, detect_execution, run_on_kvm, run_program
from .vm import KvmUnavailable

__all__ = ["EXECUTION_MODES", "KvmUnavailable", "detect_execution", "run_on_kvm", "run_program"]
