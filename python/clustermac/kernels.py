"""Which code computed a file's numbers: recorded beside its settings, checked when rows are mixed.

A descriptor's bits depend on its settings (recorded as ``settings``) and also on the code that
ran: clustermac gives the same bits at every thread count and batch size, but not on every
kind of CPU. Measured (README, "Similarity precision and clustering speed"): the C++ core's
scalar level (no FMA) gives other bits than its AVX2 level for the similarity of Eq. (3), the
NCut eigenvectors, the per-image PCA and the whitening products; AML's AVX-512 and AVX2 levels
give other scores; and ONNX Runtime picks its CPU kernels from the instruction sets it finds.
Versions of either library may change bits too.

:func:`kernel_record` describes this process: ``{"clustermac", "simd_level", "onnxruntime",
"cpu_features", "cpu"}``. Descriptor manifests, shard records, whitening files and index
folders keep such records under ``"kernels"``, outside ``settings``: a file made on one machine
still loads on any other, and settings fingerprints (what a resumed run adopts) are unchanged.
When the rows of one output come from processes whose records differ (a run resumed on another
kind of machine, a Ray cluster of mixed nodes, an index appended to from elsewhere), the
output lists every record and a :class:`~clustermac.errors.MixedKernelsWarning` says so: the
same image may then have descriptors that differ in their last bits between rows.
"""

from __future__ import annotations

import functools
import platform
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import MixedKernelsWarning

__all__ = [
    "kernel_record",
    "same_kernels",
    "distinct_kernels",
    "recorded_kernels",
    "runs_here",
    "describe_kernels",
    "warn_if_mixed",
    "KERNEL_KEYS",
]

#: The keys of a record that decide bits; ``cpu`` (the model name) is only for the reader.
KERNEL_KEYS = ("clustermac", "simd_level", "onnxruntime", "cpu_features")

# Instruction-set flags (as Linux names them in /proc/cpuinfo) that clustermac's core or ONNX
# Runtime's CPU kernels dispatch on.
_ISA_FLAGS = (
    "fma",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


def _cpuinfo() -> tuple[list[str] | None, str | None]:
    """(the ISA flags of _ISA_FLAGS this CPU has, its model name) from /proc/cpuinfo; (None, None)
    where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor is enough: every core of a machine has the same
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return [flag for flag in _ISA_FLAGS if flag in flags], fields.get("model name")


@functools.lru_cache(maxsize=1)
def _record() -> tuple[tuple[str, Any], ...]:
    from . import __version__, _core

    try:  # the module's own version: also right for onnxruntime-gpu and the other builds of it
        import onnxruntime

        runtime_version = str(onnxruntime.__version__)
    except ImportError:
        runtime_version = None
    features, model = _cpuinfo()
    return (
        ("clustermac", __version__),
        ("simd_level", _core.simd_level()),
        ("onnxruntime", runtime_version),
        ("cpu_features", features),
        ("cpu", model or platform.processor() or platform.machine() or None),
    )


def kernel_record() -> dict[str, Any]:
    """What decides the last bits of the numbers this process computes, besides the settings:
    ``clustermac`` (version), ``simd_level`` (the C++ core's: ``"avx512"``, ``"avx2"`` or
    ``"scalar"``, see ``clustermac._core.simd_level``), ``onnxruntime`` (version, or None),
    ``cpu_features`` (the instruction sets among FMA, AVX2, AVX-512, VNNI, BF16, FP16 and AMX
    that the CPU has, by their Linux names; None where /proc/cpuinfo is not available) and
    ``cpu`` (the model name, for the reader; it is not compared)."""
    return {key: (list(value) if isinstance(value, list) else value) for key, value in _record()}


def same_kernels(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two records describe the same code (every key of :data:`KERNEL_KEYS` equal). An
    empty record (a file written before clustermac recorded kernels) equals only another one."""
    return all(a.get(key) == b.get(key) for key in KERNEL_KEYS) and (not a) == (not b)


def distinct_kernels(records: Iterable[Any]) -> list[dict[str, Any]]:
    """The records that differ (:func:`same_kernels`), in their first order; anything that is
    not a record (None, or a malformed entry of a file) counts as the empty record (not recorded)."""
    out: list[dict[str, Any]] = []
    for record in records:
        record = dict(record) if isinstance(record, Mapping) else {}
        if not any(same_kernels(record, seen) for seen in out):
            out.append(record)
    return out


def recorded_kernels(value: Any) -> list[dict[str, Any]]:
    """The list of records a file keeps under ``"kernels"`` (:func:`distinct_kernels` of it);
    ``[{}]`` (not recorded) when the file has none or holds something else there."""
    return distinct_kernels(value) if isinstance(value, list) and value else [{}]


def runs_here(records: list[dict[str, Any]]) -> bool | None:
    """Whether this process runs the code of every known record in ``records`` (None when none
    is known: nothing to compare)."""
    known = [record for record in records if record]
    here = kernel_record()
    return all(same_kernels(record, here) for record in known) if known else None


def describe_kernels(record: Mapping[str, Any]) -> str:
    """One line for a person: ``clustermac 0.1.0, core avx2, onnxruntime 1.23.2, CPU AMD EPYC
    (fma avx2)``."""
    if not record:
        return "not recorded (written by an earlier clustermac)"
    features = record.get("cpu_features")
    return (
        f"clustermac {record.get('clustermac')}, core {record.get('simd_level')}, "
        f"onnxruntime {record.get('onnxruntime')}, CPU {record.get('cpu')} "
        f"({' '.join(features) if features else 'features unknown' if features is None else 'no FMA or AVX'})"
    )


def warn_if_mixed(records: list[dict[str, Any]], what: str, stacklevel: int = 2) -> None:
    """A :class:`MixedKernelsWarning` naming ``what`` when ``records`` (distinct ones, as
    :func:`distinct_kernels` gives) hold more than one known record (an empty record, rows
    written before clustermac recorded kernels, cannot be told apart and is not warned about)."""
    if sum(1 for record in records if record) > 1:
        lines = "; ".join(f"({i + 1}) {describe_kernels(r)}" for i, r in enumerate(records))
        warnings.warn(
            MixedKernelsWarning(
                f"{what}: its rows were computed by {len(records)} kinds of code: {lines}. Descriptors of "
                "the same image may differ in their last bits between them; for byte-identical results "
                "compute every row with the same clustermac, ONNX Runtime and kind of CPU"
            ),
            stacklevel=stacklevel + 1,
        )
