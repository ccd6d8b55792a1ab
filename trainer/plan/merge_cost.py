"""What ``output.merge`` costs, for the Validating phase's estimate: host memory, disk, seconds,
and GPU memory for ``mergeBase: dequantized``.

The merge (:mod:`~kubetune.trainer.publish.merging`) writes the whole base in the compute dtype
with the adapter folded in, so every figure scales with that size: ``params × bytes per
parameter``. The ratios are the 7B merge measured on an H100 machine (16 host cores, its local
disk; ``bench/merge_7b.py``, ``bench/results/h100-2026-12-05-s3-merge-7b.jsonl``,
docs/performance.md): 12.55 GiB written; ``original`` 35.1 s and 13.69 GiB of host memory,
``dequantized`` 48.7 s, 14.27 GiB of host memory and 15.76 GiB of GPU memory. Seconds depend on the
node's disk and cores: read them as that machine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from kubetune.trainer.plan.shape import ModelShape

GIB: Final = 1024**3
MEASURED_GIB: Final = 12.55


@dataclass(frozen=True)
class _PerGiB:
    """Per GiB of merged weights, as measured."""

    host: float
    gpu: float
    seconds: float


_MEASURED: Final[dict[str, _PerGiB]] = {
    "original": _PerGiB(host=13.69 / MEASURED_GIB, gpu=0.0, seconds=35.1 / MEASURED_GIB),
    "dequantized": _PerGiB(
        host=14.27 / MEASURED_GIB, gpu=15.76 / MEASURED_GIB, seconds=48.7 / MEASURED_GIB
    ),
}
#: Bytes per parameter of the merged weights in each compute dtype.
_DTYPE_BYTES: Final = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class MergeCost:
    disk_gib: float
    host_gib: float
    gpu_gib: float | None
    seconds: float


def merge_cost(
    shape: ModelShape, into: Literal["original", "dequantized"], compute_dtype: str
) -> MergeCost:
    """The merge of a base of ``shape`` into ``into``, in ``compute_dtype``."""
    params = shape.linear_params() + shape.embedding_params()
    size = params * _DTYPE_BYTES.get(compute_dtype, 2) / GIB
    per = _MEASURED[into]
    return MergeCost(
        disk_gib=size,
        host_gib=size * per.host,
        gpu_gib=size * per.gpu if per.gpu else None,
        seconds=size * per.seconds,
    )
