"""``kd-overhead``: a KD student training step (online or cached teacher) against the baseline step."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import brats_kd.losses
import brats_kd.networks
import brats_kd.teacher
import brats_kd.trainer
from tools.bench.common import (
    DEFAULT_FILTERS,
    GOALS,
    _median,
    _positive,
    _triple,
    _write,
    environment,
    interleaved_times,
)

# --------------------------------------------------------------------------------------------
# training steps: baseline, KD online, KD cached


def synthetic_batch(batch_size: int, spatial: tuple[int, int, int], filters: Sequence[int], seed: int = 0) -> dict:
    """A batch as the train loader delivers it (MetaTensors on the CPU), with cached-mode targets too."""
    import torch
    from monai.data import MetaTensor

    generator = torch.Generator().manual_seed(seed)
    down = 2 ** (len(filters) - 1)

    def meta(*shape):
        return MetaTensor(torch.randn(batch_size, *shape, generator=generator))

    label = MetaTensor((torch.rand(batch_size, 3, *spatial, generator=generator) > 0.9).float())
    return {
        "image": meta(1, *spatial),
        "teacher_image": meta(4, *spatial),
        "label": label,
        "teacher_logits": meta(3, *spatial),
        "teacher_bottleneck": meta(filters[-1], *(s // down for s in spatial)),
    }


class TrainingSteps:
    """One training step of each variant, built from the kd_student bundle's own classes.

    ``baseline``: a 1-channel ``EncoderDecoder`` trained by ``SupervisedTrainer`` with Dice + BCE.
    ``kd_online``: ``FrozenTeacher`` (4-channel Teacher, no autograd) then ``KDTrainer``.
    On CUDA every variant runs as ``configs/gpu.json`` trains: autocast in bfloat16 (float16 with a GradScaler where
    bfloat16 is missing), the teacher under ``inference_mode``.
    ``kd_cached``: ``KDTrainer`` with the Teacher's targets already in the batch.
    ``teacher_forward``: ``FrozenTeacher`` alone (explains the online overhead).
    ``baseline_copy``: a second, identical baseline: its ratio to ``baseline`` is the noise floor (an A/A test).
    ``kd_online_bf16_teacher`` (CPU only): ``kd_online`` with ``FrozenTeacher(cpu_bf16=True)``, the
    bundle's opt-in ``teacher_cpu_bf16`` (the Teacher's forward under bfloat16 autocast).
    """

    def __init__(self, device: str, batch_size: int, spatial: tuple[int, int, int], filters: Sequence[int], workdir: Path):
        import torch
        from monai.engines import SupervisedTrainer
        from monai.inferers import SimpleInferer
        from monai.losses import DiceFocalLoss

        from brats_kd.device import AutocastInferer, autocast_dtype, needs_grad_scaler

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        # on CUDA, the bundles' GPU path (configs/gpu.json): autocast in bf16 (fp16 + GradScaler without bf16)
        dtype = autocast_dtype(self.device) if cuda else None
        amp = cuda and needs_grad_scaler(self.device, dtype)
        self.batch = synthetic_batch(batch_size, spatial, filters)

        def net(channels: int):
            torch.manual_seed(0)
            return brats_kd.networks.EncoderDecoder(channels, 3, filters=filters).to(self.device)

        def gt_loss():
            return DiceFocalLoss(sigmoid=True, gamma=0.0, smooth_nr=1e-5, smooth_dr=1e-5)

        def trainer(cls, network, loss, **kwargs):
            optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
            engine = cls(device=self.device, max_epochs=1, train_data_loader=[self.batch], network=network,
                         optimizer=optimizer, loss_function=loss, amp=amp, inferer=AutocastInferer(SimpleInferer(), dtype),
                         **kwargs)
            # what Trainer.run() does first: without it an `amp` trainer stepped by hand has no GradScaler and
            # silently trains in float32 (the benchmark measured the wrong thing on CUDA before)
            engine.scaler = torch.amp.GradScaler("cuda") if amp else None
            return engine

        def objective():
            losses = brats_kd.losses
            return losses.KDNetObjective(gt_loss(), losses.KDLoss(5.0), losses.BottleneckKLLoss(), 0.75, 10.0)

        checkpoint = workdir / "teacher.pt"
        torch.save({"model": net(4).state_dict()}, checkpoint)
        self.teacher = brats_kd.teacher.FrozenTeacher(net(4), checkpoint, autocast_dtype=dtype, inference_mode=cuda)
        self.teacher.load(self.device)
        self.teacher_bf16 = brats_kd.teacher.FrozenTeacher(net(4), checkpoint, cpu_bf16=True)
        self.teacher_bf16.load(self.device)
        self.baseline = trainer(SupervisedTrainer, net(1), gt_loss())
        self.baseline_copy = trainer(SupervisedTrainer, net(1), gt_loss())
        self.online = trainer(brats_kd.trainer.KDTrainer, net(1), objective())
        self.online_bf16 = trainer(brats_kd.trainer.KDTrainer, net(1), objective())
        self.cached = trainer(brats_kd.trainer.KDTrainer, net(1), objective())
        self.online_keys = ("image", "teacher_image", "label")
        self.cached_keys = ("image", "label", "teacher_logits", "teacher_bottleneck")

    def _step(self, engine, keys, teacher=None) -> None:
        """What one Ignite iteration runs: ``ITERATION_STARTED`` handlers (the Teacher, when online), then ``_iteration``."""
        engine.state.iteration += 1
        engine.state.batch = {k: self.batch[k] for k in keys}
        if teacher is not None:
            teacher(engine)
        engine._iteration(engine, engine.state.batch)

    def run_baseline(self) -> None:
        self._step(self.baseline, ("image", "label"))

    def run_baseline_copy(self) -> None:
        self._step(self.baseline_copy, ("image", "label"))

    def run_online(self) -> None:
        self._step(self.online, self.online_keys, self.teacher)

    def run_online_bf16_teacher(self) -> None:
        self._step(self.online_bf16, self.online_keys, self.teacher_bf16)

    def run_cached(self) -> None:
        self._step(self.cached, self.cached_keys)

    def run_teacher(self) -> None:
        self.teacher.infer(self.batch["teacher_image"])

    def variants(self) -> dict[str, Callable[[], None]]:
        variants = {
            "baseline": self.run_baseline,
            "kd_online": self.run_online,
            "kd_cached": self.run_cached,
            "teacher_forward": self.run_teacher,
            "baseline_copy": self.run_baseline_copy,
        }
        if self.device.type == "cpu":
            variants["kd_online_bf16_teacher"] = self.run_online_bf16_teacher
        return variants


def profile_steps(variants: dict[str, Callable[[], None]], top: int = 8, cuda: bool = False) -> dict:
    """``torch.profiler`` table of one call of each variant: the ``top`` operators by self time (ms) on the CPU, or,
    with ``cuda``, on the GPU (CPU time says nothing about a GPU step)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]

    def self_time(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    tables = {}
    for name, run in variants.items():
        with profile(activities=activities) as prof:
            run()
        events = sorted(prof.key_averages(), key=self_time, reverse=True)
        total = sum(self_time(e) for e in events)
        tables[name] = {"total_ms": round(total / 1e3, 1)} | {e.key: round(self_time(e) / 1e3, 1) for e in events[:top]}
    return tables


def kd_overhead(
    json: str | None = None,
    device: str = "cpu",
    spatial_size: int = 64,
    batch_size: int = 2,
    steps: int = 10,
    warmup: int = 2,
    block: int = 2,
    filters: Sequence[int] = DEFAULT_FILTERS,
    threads: int | None = None,
    profile: bool = False,
) -> dict:
    """Training-step time of the baseline, the KD student with the online Teacher and with cached targets.

    Args:
        json: output file.
        device: ``cpu`` or ``cuda`` (on CUDA: bf16 autocast as in the bundles' ``configs/gpu.json``).
        spatial_size: network input size (one number or three); 64 in the paper preset.
        batch_size: cases per step (the bundles' default is 2).
        steps: timed steps per variant, after ``warmup`` untimed ones.
        block: consecutive steps of one variant per round-robin turn.
        filters: the network's filters (default: the bundles' 16 -> 256).
        threads: torch CPU threads (default: torch's choice, reported).
        profile: also record the top operators of one step of each variant (``profile`` in the JSON).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(_positive("threads", threads))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    spatial = _triple(spatial_size)
    env_before = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        steps_ = TrainingSteps(device, _positive("batch_size", batch_size), spatial, tuple(filters), Path(tmp))
        times = interleaved_times(steps_.variants(), _positive("steps", steps), int(warmup), _positive("block", block), device)
        tables = profile_steps(steps_.variants(), cuda=device.startswith("cuda")) if profile else None
    medians = {name: _median(values) for name, values in times.items()}
    result = {
        "benchmark": "kd-overhead",
        "baseline_step_s": medians["baseline"],
        "kd_online_step_s": medians["kd_online"],
        "kd_cached_step_s": medians["kd_cached"],
        "teacher_forward_s": medians["teacher_forward"],
        "ratio_online": medians["kd_online"] / medians["baseline"],
        "ratio_cached": medians["kd_cached"] / medians["baseline"],
        "teacher_forward_over_baseline": medians["teacher_forward"] / medians["baseline"],
        "baseline_copy_step_s": medians["baseline_copy"],
        "ratio_baseline_copy": medians["baseline_copy"] / medians["baseline"],  # A/A: ~1 +- the noise floor
        **(
            {
                "kd_online_bf16_teacher_step_s": medians["kd_online_bf16_teacher"],
                "ratio_online_bf16_teacher": medians["kd_online_bf16_teacher"] / medians["baseline"],
            }
            if "kd_online_bf16_teacher" in medians
            else {}
        ),
        "goals": GOALS,
        "spatial_size": list(spatial),
        "batch_size": batch_size,
        "filters": list(filters),
        "steps": steps,
        "warmup": warmup,
        "block": block,
        "step_times_s": {name: [round(t, 4) for t in values] for name, values in times.items()},
        **environment(device),
        "loadavg_before": env_before["loadavg"],
    }
    if tables is not None:
        result["profile"] = tables
    result["meets_goal_online"] = result["ratio_online"] <= GOALS["ratio_online"]
    result["meets_goal_cached"] = result["ratio_cached"] <= GOALS["ratio_cached"]
    return _write(json, result)


