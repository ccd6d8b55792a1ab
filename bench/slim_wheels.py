"""Drop the CUDA 11/12 and ROCm libraries from the bitsandbytes wheel in ``.whl/``, in place.

The GPU machine's torch is a CUDA 13 build, so bitsandbytes loads ``libbitsandbytes_cuda13x.so``
only; the wheel carries every CUDA and ROCm version's library (43 MB of its 45), and with
``.whl/extra`` (bench/gpu.sh) the checkout then passes the device's 64 MiB carry limit. The
wheel's RECORD loses the dropped files' lines, so pip installs it as any other wheel:

    python3 bench/slim_wheels.py        # after ../shared/gpu/fetch-wheels.sh
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

DROPPED = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[12]\d|rocm\d+)\.so$")


def slim(wheel: Path) -> int:
    """Rewrite ``wheel`` without the :data:`DROPPED` libraries; returns the bytes saved."""
    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with (
        zipfile.ZipFile(wheel) as source,
        zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for entry in source.infolist():
            if DROPPED.search(entry.filename):
                continue
            data = source.read(entry)
            if entry.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                kept = [line for line in lines if not DROPPED.search(line.split(",", 1)[0])]
                data = ("\n".join(kept) + "\n").encode()
            out.writestr(entry, data)
    slimmed.replace(wheel)
    return before - wheel.stat().st_size


def main() -> int:
    wheels = sorted(Path(".whl").glob("bitsandbytes-*.whl"))
    for wheel in wheels:
        print(f"{wheel}: {slim(wheel) / 2**20:.1f} MiB less")
    return 0 if wheels else 1


if __name__ == "__main__":
    sys.exit(main())
