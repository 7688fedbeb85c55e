"""``train-throughput``: training samples per second of every KD-Net model, built from its bundle's own configs.

Each variant is the bundle's ``train#trainer`` with its ``train#dataloader`` (``train.json``, plus
``configs/gpu.json`` on the GPU path), over the same phantom cases; one step is what one Ignite
iteration runs: the next batch from the loader, the ``ITERATION_STARTED`` handlers that feed the
model (the frozen teacher, when online), then ``_iteration`` (forward, loss, backward, optimizer).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from brats_kd.config import as_flag, resolve_paths
from tools.bench.common import (
    DEFAULT_FILTERS,
    GOALS,
    PATH_KEYS,
    _bundle_parser,
    _median,
    _positive,
    _sync,
    _triple,
    _write,
    environment,
)
from tools.bench.gpu_check import write_phantom
from tools.bench.inference import BlockPeakRss, _rss_kb

#: variant -> (bundle, extra config files, extra overrides); teacher_copy is the A/A control of teacher
VARIANTS = {
    "teacher": ("teacher", [], {}),
    "baseline": ("teacher", ["baseline.json"], {}),
    "student_online": ("kd_student", [], {"teacher_mode": "online"}),
    "student_cached": ("kd_student", [], {"teacher_mode": "cached"}),
    "teacher_copy": ("teacher", [], {}),
}
COMPILED = ("teacher", "baseline")  # KDTrainer does not support compile


class Variant:
    """One model's trainer and loader, stepped by hand (no ``run()``), as one Ignite iteration would step them."""

    def __init__(self, name: str, bundle: str, configs: list[str], overrides: dict, device) -> None:
        import torch
        from monai.engines import Trainer

        self.name, self.device = name, device
        parser = _bundle_parser(configs, overrides, bundle)
        start = time.perf_counter()
        self.loader = parser.get_parsed_content("train#dataloader")  # CacheDataset fill
        self.cache_fill_s = time.perf_counter() - start
        self.engine = parser.get_parsed_content("train#trainer")
        # what Trainer.run() would do before the first iteration: the float16 GradScaler (only with `amp`)
        # and the frozen teacher's loading (Events.STARTED)
        assert isinstance(self.engine, Trainer)
        self.engine.scaler = torch.amp.GradScaler("cuda") if self.engine.amp else None
        self.feeders = parser.get_parsed_content("train#teacher_handlers") if "train#teacher_handlers" in parser else []
        for teacher in self.feeders:
            teacher.load(teacher.device if teacher.device is not None else self.engine.state.device)
        self.engine.state.epoch, self.engine.state.epoch_length = 1, len(self.loader)
        self.amp_dtype = str(parser.get_parsed_content("amp_dtype")) if "amp_dtype" in parser else None
        self._batches = iter(self.loader)
        self.wait_s: list[float] = []  # steady state: steps that continue an epoch
        self.waited_step_s: list[float] = []  # the same steps' durations
        self.epoch_start_wait_s: list[float] = []  # steps that start a new pass over the loader
        self.step_s: list[float] = []

    def _next_batch(self) -> tuple[object, bool]:
        try:
            return next(self._batches), False
        except StopIteration:
            self._batches = iter(self.loader)
            return next(self._batches), True

    def step(self, record: bool, record_wait: bool) -> None:
        start = time.perf_counter()
        batch, new_epoch = self._next_batch()
        got = time.perf_counter()
        engine = self.engine
        engine.state.iteration += 1
        engine.state.batch = batch
        for feed in self.feeders:
            feed(engine)
        engine._iteration(engine, engine.state.batch)
        _sync(self.device)
        if record:
            self.step_s.append(time.perf_counter() - start)
            if new_epoch:
                self.epoch_start_wait_s.append(got - start)
            elif record_wait:
                self.wait_s.append(got - start)
                self.waited_step_s.append(self.step_s[-1])


def _run_interleaved(variants: dict[str, Variant], steps: int, warmup: int, block: int, device) -> dict[str, dict]:
    """Warm-up, then round-robin blocks of ``block`` steps per variant (order rotated every round); peak memory of
    each variant's blocks. The first step of a block finds a batch the loader prefetched while other variants ran,
    so the data wait is taken from the block's later steps (all steps when ``block`` is 1), and from steps that
    continue an epoch (the wait of a step starting one is reported apart)."""
    import torch

    cuda = str(device).startswith("cuda")
    for variant in variants.values():
        for _ in range(warmup):
            variant.step(record=False, record_wait=False)
    method = "torch.cuda.max_memory_allocated"  # on the CPU: the BlockPeakRss method of the blocks
    memory = {name: {"peak_mb": 0.0, "peak_increase_mb": 0.0} for name in variants}
    names, round_index = list(variants), 0
    while any(len(v.step_s) < steps for v in variants.values()):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            variant = variants[name]
            n = min(block, steps - len(variant.step_s))
            if n <= 0:
                continue
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                before = _rss_kb("VmRSS") * 1024
            with contextlib.nullcontext() if cuda else BlockPeakRss() as rss:
                for i in range(n):
                    variant.step(record=True, record_wait=i > 0 or block == 1)
            if cuda:
                peak = torch.cuda.max_memory_allocated()
            else:
                peak, method = rss.peak_kb * 1024, rss.method
            memory[name]["peak_mb"] = max(memory[name]["peak_mb"], peak / 2**20)
            memory[name]["peak_increase_mb"] = max(memory[name]["peak_increase_mb"], (peak - before) / 2**20)
        round_index += 1
    return {"memory": memory, "memory_method": method}


def _summary(variant: Variant, batch_size: int, memory: dict) -> dict:
    step = _median(variant.step_s)
    if not variant.wait_s:
        raise ValueError(f"{variant.name}: no step continued an epoch; use more --cases or a larger --block")
    return {
        "samples_per_s": batch_size / step,
        "step_s": step,
        "data_wait_s": _median(variant.wait_s),
        # the time blocked on the loader over the same steps' duration, steps that continue an epoch
        "data_wait_fraction": sum(variant.wait_s) / sum(variant.waited_step_s),
        # a new pass over the loader starts its thread / workers: once per epoch (len(loader) steps)
        "epoch_start_wait_s": _median(variant.epoch_start_wait_s) if variant.epoch_start_wait_s else None,
        "steps_per_epoch": len(variant.loader),
        "peak_memory_mb": memory["peak_mb"],
        "peak_memory_increase_mb": memory["peak_increase_mb"],
        "cache_fill_s": variant.cache_fill_s,
        "amp_dtype": variant.amp_dtype,
        "step_times_s": [round(t, 4) for t in variant.step_s],
    }


def train_throughput(
    json: str | None = None,
    device: str = "cpu",
    spatial_size: int = 64,
    batch_size: int = 2,
    steps: int = 10,
    warmup: int = 2,
    block: int = 2,
    cases: int = 8,
    phantom_size: int | None = None,
    filters: Sequence[int] = DEFAULT_FILTERS,
    gpu_config=None,
    compile=False,
    num_workers: int | None = None,
    threads: int | None = None,
) -> dict:
    """Training samples/s of teacher, baseline, student with online teacher and with cached targets, in one
    interleaved run, with the data-wait fraction of a step, peak memory and an A/A control.

    Args:
        json: output file.
        device: ``cpu`` or ``cuda``.
        spatial_size: network input size (64: the paper's).
        batch_size: cases per step (the bundles' default is 2).
        steps: timed steps per variant after ``warmup`` untimed ones, in round-robin blocks of ``block``.
        cases: phantom training cases (the loaders cycle over them).
        phantom_size: phantom volume size (default: twice ``spatial_size``, between 32 and 128).
        filters: the networks' filters (default: the bundles' 16 -> 256), with a skip connection at every level.
        gpu_config: merge every bundle's ``configs/gpu.json`` (default: on CUDA only, i.e. each device's own path).
        compile: also time ``teacher`` and ``baseline`` under ``torch.compile`` (``*_compiled``; gpu config only).
        num_workers: the loaders' worker processes (default: the config's; gpu.json uses a thread).
        threads: torch CPU threads (default: torch's choice, reported).

    Reported per variant: ``samples_per_s`` (batch / median step), ``data_wait_fraction`` (time blocked on the
    loader / step time), peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS), the cache fill;
    ratios to ``baseline`` (``teacher_copy`` / ``teacher`` is the A/A noise floor).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(_positive("threads", threads))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    spatial = _triple(spatial_size)
    batch_size, steps, block = _positive("batch_size", batch_size), _positive("steps", steps), _positive("block", block)
    use_gpu_config = device.startswith("cuda") if gpu_config is None else as_flag(gpu_config)
    compile = as_flag(compile)
    if compile and not use_gpu_config:
        raise ValueError("--compile true needs the gpu config (its `compile` value); add --gpu-config true")
    size = phantom_size if phantom_size is not None else min(max(2 * max(spatial), 32), 128)
    env_before = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datalist = write_phantom(work, _positive("cases", cases), _positive("phantom_size", size))
        checkpoint = work / "teacher.pt"
        import brats_kd.networks

        torch.manual_seed(0)
        skips = len(filters) - 1  # every level has its skip connection, as the bundles' 5 levels have 4
        torch.save({"model": brats_kd.networks.EncoderDecoder(4, 3, tuple(filters), skips).state_dict()}, checkpoint)
        common = {
            "datalist": str(work / "datalist.json"),
            "train_datalist": resolve_paths(datalist["training"], datalist["dataset_dir"], PATH_KEYS),  # every case trains
            "spatial_size": list(spatial),
            "filters": list(filters),
            "skip_connections": skips,
            "batch_size": batch_size,
            "device": device,
            "epochs": 1,
            "teacher_ckpt": str(checkpoint),
            "teacher_cache_dir": str(work / "cache"),
        }
        if num_workers is not None:
            common["num_workers"] = int(num_workers)
        with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
            _bundle_parser(["train.json", "cache_teacher.json"], {**common, "output_dir": str(work / "cache")}) \
                .get_parsed_content("teacher_cache").run()
        gpu = ["gpu.json"] if use_gpu_config else []
        plan = dict(VARIANTS)
        if compile:
            for name in COMPILED:
                bundle, extra, overrides = VARIANTS[name]
                plan[f"{name}_compiled"] = (bundle, extra, {**overrides, "compile": True})
        variants = {}
        for name, (bundle, extra, overrides) in plan.items():
            folder = work / name
            settings = {k: v for k, v in common.items() if bundle == "kd_student" or not k.startswith("teacher_")}
            variants[name] = Variant(
                name, bundle, ["train.json", *extra, *gpu],
                {**settings, **overrides, "ckpt_dir": str(folder / "models"), "output_dir": str(folder / "runs")}, device,
            )
        measured = _run_interleaved(variants, steps, int(warmup), block, device)
    results = {name: _summary(v, batch_size, measured["memory"][name]) for name, v in variants.items()}
    base = results["baseline"]["step_s"]
    result = {
        "benchmark": "train-throughput",
        "models": results,
        "ratio_student_online": results["student_online"]["step_s"] / base,
        "ratio_student_cached": results["student_cached"]["step_s"] / base,
        "ratio_teacher": results["teacher"]["step_s"] / base,
        "ratio_teacher_copy": results["teacher_copy"]["step_s"] / results["teacher"]["step_s"],  # A/A: ~1 +- noise
        **(
            {f"ratio_{name}_compiled": results[f"{name}_compiled"]["step_s"] / results[name]["step_s"] for name in COMPILED}
            if compile else {}
        ),
        "goals": GOALS,
        "gpu_config": use_gpu_config,
        "memory_method": measured["memory_method"],
        "spatial_size": list(spatial),
        "batch_size": batch_size,
        "filters": list(filters),
        "cases": cases,
        "phantom_size": size,
        "steps": steps,
        "warmup": warmup,
        "block": block,
        **environment(device),
        "loadavg_before": env_before["loadavg"],
    }
    return _write(json, result)
