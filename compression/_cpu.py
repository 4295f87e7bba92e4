"""What this CPU's INT8 kernels do: whether onnxruntime's u8s8 products can saturate here."""

from __future__ import annotations

import functools
import platform

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
"""``/proc/cpuinfo`` flags of an x86 dot-product instruction that sums u8×s8 in 32 bits."""
_X86 = frozenset({"x86_64", "amd64", "i686", "i386"})


def saturates(machine: str, cpuinfo: str | None) -> bool:
    """Whether u8×s8 pair sums saturate on a CPU described by ``platform.machine()`` and the
    text of ``/proc/cpuinfo`` (``None`` where it cannot be read).

    On x86 without VNNI onnxruntime multiplies with ``VPMADDUBSW``, whose sum of two u8×s8
    products is kept in 16 bits: two large products overflow and clamp, so a model with
    full-range (8-bit) weights computes a little differently there than on a VNNI host or
    an ARM one. 7-bit weights (onnxruntime's ``reduce_range``) cannot overflow the pair sum
    (2 × 255 × 64 < 2¹⁵). Where the flags are unknown the answer is no.
    """
    if machine.lower() not in _X86 or cpuinfo is None:
        return False
    flags = next((line.split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool(flags) and not (VNNI_FLAGS & set(flags))


@functools.cache
def u8s8_saturates() -> bool:
    """:func:`saturates` for this machine (Linux's ``/proc/cpuinfo``; elsewhere no)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            text: str | None = fh.read()
    except OSError:
        text = None
    return saturates(platform.machine(), text)
