"""Which of the node's GPUs each pod gets: the scheduler has already counted them against the
node's ``nvidia.com/gpu`` capacity, the node picks the devices."""

from __future__ import annotations

import glob
import threading

from kubetune.local.rest import JSON

GPU_RESOURCE = "nvidia.com/gpu"


def gpus_requested(pod: JSON) -> int:
    """The GPUs the pod's containers ask for (limits, else requests)."""
    total = 0
    for container in pod["spec"].get("containers", []):
        resources = container.get("resources", {})
        value = resources.get("limits", {}).get(GPU_RESOURCE) or resources.get("requests", {}).get(
            GPU_RESOURCE
        )
        total += int(value or 0)
    return total


def gpu_device_paths() -> tuple[str, ...]:
    """The host's GPU device files, to bind into each container's minimal /dev."""
    return tuple(sorted(glob.glob("/dev/nvidia*") + glob.glob("/dev/dri")))


class GpuAllocator:
    """Hands out device indexes ``0..count-1`` to pods and takes them back."""

    def __init__(self, count: int) -> None:
        self._free = list(range(count))
        self._held: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def allocate(self, uid: str, pod: JSON) -> dict[str, str]:
        """Devices for the pod ``uid``, as the environment that makes them visible to it."""
        wanted = gpus_requested(pod)
        if not wanted:
            return {}
        with self._lock:
            held, self._free = self._free[:wanted], self._free[wanted:]
            self._held[uid] = held
        visible = ",".join(map(str, held))
        return {"CUDA_VISIBLE_DEVICES": visible, "NVIDIA_VISIBLE_DEVICES": visible}

    def release(self, uid: str) -> None:
        with self._lock:
            self._free += self._held.pop(uid, [])
