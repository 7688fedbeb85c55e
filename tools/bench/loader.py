"""``loader``: data-loader throughput of the kd_student bundle, online and cached teacher modes."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import brats_kd.losses
import brats_kd.networks
import brats_kd.teacher
import brats_kd.trainer
from brats_kd.config import resolve_paths
from tools.bench.common import (
    DEFAULT_FILTERS,
    PATH_KEYS,
    _bundle_parser,
    _median,
    _positive,
    _triple,
    _write,
    environment,
    interleaved_times,
)
from tools.bench.kd_overhead import TrainingSteps

# --------------------------------------------------------------------------------------------
# data loader throughput


def _phantom_datalist(folder: Path, cases: int, size: int) -> dict:
    from tools.phantom import write_dataset
    from tools.prepare import prepare

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
        write_dataset(folder / "data", layout="brats2021", cases=cases, size=size, seed=0)
        return prepare(folder / "data", folder / "datalist.json", folds=2, seed=0)




def _loader_rate(overrides: dict, epochs: int, cases: int) -> dict:
    """Build the bundle's ``train#dataloader`` (timing the CacheDataset fill) and time ``epochs`` passes over it."""
    parser = _bundle_parser(["train.json"], overrides)
    start = time.perf_counter()
    loader = parser.get_parsed_content("train#dataloader")
    fill_s = time.perf_counter() - start
    seconds, keys = [], set()
    for _ in range(epochs):
        start = time.perf_counter()
        delivered = 0
        for batch in loader:
            delivered += len(batch["label"])
            keys.update(batch)
        seconds.append(time.perf_counter() - start)
    if delivered != cases:
        raise RuntimeError(f"the loader delivered {delivered} cases per epoch, expected {cases}")
    epoch_s = _median(seconds)
    return {"cache_fill_s": fill_s, "epoch_s": epoch_s, "loader_cases_per_s": cases / epoch_s, "batch_keys": sorted(keys)}


def _build_cache(overrides: dict, workdir: Path, filters: Sequence[int]) -> float:
    """Run the bundle's cache step (configs/cache_teacher.json) with a random-weight Teacher; returns seconds."""
    import torch

    torch.manual_seed(0)
    checkpoint = workdir / "teacher.pt"
    torch.save({"model": brats_kd.networks.EncoderDecoder(4, 3, filters=filters).state_dict()}, checkpoint)
    overrides["teacher_ckpt"] = str(checkpoint)
    start = time.perf_counter()
    _bundle_parser(["train.json", "cache_teacher.json"], overrides).get_parsed_content("teacher_cache").run()
    return time.perf_counter() - start


def loader(
    json: str | None = None,
    teacher_mode: str = "both",
    cases: int = 8,
    phantom_size: int = 96,
    spatial_size: int = 64,
    crop_size: int = 128,
    batch_size: int = 2,
    num_workers: int | None = None,
    cache_rate: float = 1.0,
    epochs: int = 3,
    steps: int = 4,
    filters: Sequence[int] = DEFAULT_FILTERS,
    threads: int | None = None,
) -> dict:
    """Cases/s delivered by the kd_student bundle's train dataloader vs cases/s consumed by training steps.

    The loader is the bundle's ``train#dataloader`` (``CacheDataset`` with ``cache_rate``, the configured
    random flips and ``num_workers``: default the config's) over ``cases`` phantom cases; the consumption
    rate is ``batch_size`` / the median step time of the matching KD step (:class:`TrainingSteps`).
    ``headroom`` > 1 means the loader delivers faster than training consumes.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(_positive("threads", threads))
    modes = {"both": ("online", "cached"), "online": ("online",), "cached": ("cached",)}.get(teacher_mode)
    if modes is None:
        raise ValueError(f"--teacher-mode must be online, cached or both, got {teacher_mode!r}")
    spatial = _triple(spatial_size)
    result = {
        "benchmark": "loader",
        "cases": cases,
        "phantom_size": phantom_size,
        "spatial_size": list(spatial),
        "crop_size": list(_triple(crop_size)),
        "batch_size": batch_size,
        "cache_rate": cache_rate,
        "epochs": epochs,
        "filters": list(filters),
        "modes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datalist = _phantom_datalist(work, _positive("cases", cases), _positive("phantom_size", phantom_size))
        overrides = {
            "datalist": str(work / "datalist.json"),
            # every case trains
            "train_datalist": resolve_paths(datalist["training"], datalist["dataset_dir"], PATH_KEYS),
            "spatial_size": list(spatial),
            "crop_size": list(_triple(crop_size)),
            "filters": list(filters),
            "batch_size": batch_size,
            "cache_rate": cache_rate,
            "teacher_cache_dir": str(work / "cache"),
        }
        if num_workers is not None:
            overrides["num_workers"] = int(num_workers)
        result["num_workers"] = _bundle_parser(["train.json"], overrides).get_parsed_content("num_workers")
        steps_ = TrainingSteps("cpu", batch_size, spatial, tuple(filters), work)
        step_runs = {"online": steps_.run_online, "cached": steps_.run_cached}
        for mode in modes:
            mode_overrides = {**overrides, "teacher_mode": mode}
            entry = {}
            if mode == "cached":
                entry["cache_build_s"] = _build_cache(mode_overrides, work, tuple(filters))
            entry.update(_loader_rate(mode_overrides, _positive("epochs", epochs), cases))
            step_s = _median(interleaved_times({mode: step_runs[mode]}, _positive("steps", steps), 1, 1, "cpu")[mode])
            entry["train_step_s"] = step_s
            entry["train_cases_per_s"] = batch_size / step_s
            entry["headroom"] = entry["loader_cases_per_s"] / entry["train_cases_per_s"]
            result["modes"][mode] = entry
    result.update(environment("cpu"))
    return _write(json, result)


