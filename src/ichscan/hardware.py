"""What this machine offers: usable CPU cores, native bf16, and the precision ``auto`` resolves to.

One home for the questions training, prediction, the cache builder and the benchmarks all ask. torch is
imported only when a CUDA device is asked about, so ingest can call :func:`cpu_count` without it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask: a container's or ``taskset``'s share), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_bf16_support() -> dict[str, bool]:
    """Which native bf16 instruction sets this CPU has."""
    flags = cpu_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def resolve_precision(precision: str, device: str | object, *, fp16_fallback: bool = False) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``precision`` on ``device`` (a torch device or its name).

    ``auto`` picks bf16 only where it is computed natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16 or
    AMX. Emulated bf16 on other CPUs is slower than fp32, so ``auto`` keeps fp32 there. On a CUDA GPU without
    bf16, ``auto`` gives fp16 when ``fp16_fallback`` (training, which scales its loss) and fp32 otherwise.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp16" if fp16_fallback else "fp32"
    return "bf16" if any(cpu_bf16_support().values()) else "fp32"


def autocast_dtype(precision: str):
    """The ``torch.autocast`` dtype of a resolved precision; None for fp32 (no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 computed as IEEE single precision for the span of the block, the settings before it back after.

    PyTorch lets cuDNN convolutions use TF32 by default on GPUs that have it (Ampere and later): 10 bits of
    mantissa instead of 23, about 1e-3 off in a probability, so "fp32" on such a GPU would not give the
    numbers fp32 gives on a CPU. Inside this block cuDNN convolutions and RNNs and CUDA matmuls use IEEE fp32
    (``torch.backends.*.fp32_precision = "ieee"``; the older ``allow_tf32`` flags where torch has no such
    setting). Nothing changes on a CPU, whose fp32 is IEEE already."""
    import torch

    b = torch.backends
    targets = [t for t in (getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
                           getattr(b.cuda, "matmul", None)) if t is not None and hasattr(t, "fp32_precision")]
    if targets:
        saved = [t.fp32_precision for t in targets]
        try:
            for t in targets:
                t.fp32_precision = "ieee"
            yield
        finally:
            for t, value in zip(targets, saved):
                t.fp32_precision = value
        return
    saved_flags = (b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    try:
        b.cudnn.allow_tf32 = b.cuda.matmul.allow_tf32 = False
        yield
    finally:
        b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved_flags
