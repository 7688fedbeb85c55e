"""Shared helpers of the benchmarks: interleaved timing, environment record, JSON output."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from brats_kd.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
BUNDLES = ROOT / "bundles"
PATH_KEYS = ("t1", "t1ce", "t2", "flair", "label")  # datalist entries holding file paths
DEFAULT_FILTERS = (16, 32, 64, 128, 256)  # the bundles' default network
GOALS = {"ratio_online": 1.25, "ratio_cached": 1.05}
ZOO_ROI = (240, 240, 160)  # MONAI model zoo brats_mri_segmentation inference.json


# --------------------------------------------------------------------------------------------
# shared helpers


def _triple(value) -> tuple[int, int, int]:
    values = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3)]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"expected one positive size or three, got {value!r}")
    return tuple(values)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    return int(value)


def environment(device) -> dict:
    """Machine, threads, load and versions recorded with every result."""
    import monai
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else cpu,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # malloc settings change step times (docs/performance.md)
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
    }


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(variants: dict[str, Callable[[], None]], steps: int, warmup: int, block: int, device) -> dict:
    """Run every variant ``warmup`` times, then ``steps`` timed calls each in round-robin blocks of ``block``
    calls, rotating the order every round; returns ``{name: [seconds per call]}``."""
    for run in variants.values():
        for _ in range(warmup):
            run()
    _sync(device)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    round_index = 0
    while any(len(t) < steps for t in times.values()):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            for _ in range(min(block, steps - len(times[name]))):
                start = time.perf_counter()
                variants[name]()
                _sync(device)
                times[name].append(time.perf_counter() - start)
        round_index += 1
    return times


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _write(json_path: str | None, result: dict) -> dict:
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, result)
    return result

def _bundle_parser(configs: Sequence[str], overrides: dict, bundle: str = "kd_student"):
    """A ``ConfigParser`` holding ``bundle``'s ``configs`` with ``bundle_root`` and ``overrides`` applied."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(BUNDLES / bundle), **overrides})
    return parser
