"""This machine's CPU signature, for caches of compiled CPU code.

Code compiled for one CPU (``-march=native`` kernels, XLA's CPU programs) may use instructions that
another CPU lacks, so caches that can be shared between machines (a home directory on a cluster)
are keyed by this signature. Standard library only: the command line names JAX's compilation-cache
directory after it before JAX is imported (JAX reads that directory at import), so it loads this
file without running ``simulators/__init__.py``, which imports JAX.
"""

from __future__ import annotations

import hashlib
import platform


def cpu_signature() -> str:
    """``"<machine>-<10 hex digits>"``, e.g. ``"x86_64-3f2a9c01de"``: the architecture name and a
    SHA-1 of the CPU type and its instruction-set flags (the ``flags``/``Features`` line of
    ``/proc/cpuinfo`` on Linux; elsewhere only the architecture and processor names)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            text += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine() or 'cpu'}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
