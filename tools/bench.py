"""Performance benchmarks of the KD student: training-step overhead, data-loader throughput, inference.

    python -m tools.bench kd-overhead --json OUT.json [--device cpu|cuda] [--spatial-size 64] [--batch-size 2] [--steps 10]
    python -m tools.bench loader --json OUT.json [--teacher-mode online|cached|both]
    python -m tools.bench inference --json OUT.json [--size 240]

Every figure of one command comes from one process run: variants are interleaved (round-robin
blocks, rotating order) so that drifting machine load hits them alike, and medians are reported.
Results go to ``--json`` with the machine, thread count, load average and versions. Timings are
only meaningful on an otherwise idle machine: check the reported ``loadavg``.

The training step is the bundles' own code: ``SupervisedTrainer._iteration`` for the baseline,
``KDTrainer._iteration`` with the ``FrozenTeacher`` handler (online) or with targets already in
the batch (cached) for the student, on batches shaped as the data loader delivers them.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fire

import brats_kd.losses
import brats_kd.networks
import brats_kd.teacher
import brats_kd.trainer
from brats_kd.io import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
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
    ``kd_online``: ``FrozenTeacher`` (4-channel Teacher, no autograd, AMP on CUDA) then ``KDTrainer``.
    ``kd_cached``: ``KDTrainer`` with the Teacher's targets already in the batch.
    ``teacher_forward``: ``FrozenTeacher`` alone (explains the online overhead).
    ``baseline_copy``: a second, identical baseline: its ratio to ``baseline`` is the noise floor (an A/A test).
    ``kd_online_bf16_teacher`` (CPU only): ``kd_online`` with ``FrozenTeacher(cpu_bf16=True)``, the
    bundle's opt-in ``teacher_cpu_bf16`` (the Teacher's forward under bfloat16 autocast).
    """

    def __init__(self, device: str, batch_size: int, spatial: tuple[int, int, int], filters: Sequence[int], workdir: Path):
        import torch
        from monai.engines import SupervisedTrainer
        from monai.losses import DiceFocalLoss
        self.device = torch.device(device)
        amp = self.device.type == "cuda"
        self.batch = synthetic_batch(batch_size, spatial, filters)

        def net(channels: int):
            torch.manual_seed(0)
            return brats_kd.networks.EncoderDecoder(channels, 3, filters=filters).to(self.device)

        def gt_loss():
            return DiceFocalLoss(sigmoid=True, gamma=0.0, smooth_nr=1e-5, smooth_dr=1e-5)

        def trainer(cls, network, loss, **kwargs):
            optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
            return cls(device=self.device, max_epochs=1, train_data_loader=[self.batch], network=network,
                       optimizer=optimizer, loss_function=loss, amp=amp, **kwargs)

        def objective():
            return brats_kd.losses.KDNetObjective(gt_loss(), brats_kd.losses.KDLoss(5.0), brats_kd.losses.BottleneckKLLoss(), 0.75, 10.0)

        checkpoint = workdir / "teacher.pt"
        torch.save({"model": net(4).state_dict()}, checkpoint)
        self.teacher = brats_kd.teacher.FrozenTeacher(net(4), checkpoint, amp=amp)
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
        variants = {"baseline": self.run_baseline, "kd_online": self.run_online, "kd_cached": self.run_cached,
                    "teacher_forward": self.run_teacher, "baseline_copy": self.run_baseline_copy}
        if self.device.type == "cpu":
            variants["kd_online_bf16_teacher"] = self.run_online_bf16_teacher
        return variants


def profile_steps(variants: dict[str, Callable[[], None]], top: int = 8) -> dict:
    """``torch.profiler`` table of one call of each variant: the ``top`` operators by self CPU time (ms)."""
    from torch.profiler import profile

    tables = {}
    for name, run in variants.items():
        with profile() as prof:
            run()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        tables[name] = {"total_ms": round(total / 1e3, 1)} | {
            e.key: round(e.self_cpu_time_total / 1e3, 1) for e in events[:top]
        }
    return tables


def kd_overhead(json: str | None = None, device: str = "cpu", spatial_size: int = 64, batch_size: int = 2,
                steps: int = 10, warmup: int = 2, block: int = 2, filters: Sequence[int] = DEFAULT_FILTERS,
                threads: int | None = None, profile: bool = False) -> dict:
    """Training-step time of the baseline, the KD student with the online Teacher and with cached targets.

    Args:
        json: output file.
        device: ``cpu`` or ``cuda`` (mixed precision on CUDA, as the bundles' ``amp`` default).
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
        tables = profile_steps(steps_.variants()) if profile else None
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
        **({"kd_online_bf16_teacher_step_s": medians["kd_online_bf16_teacher"],
            "ratio_online_bf16_teacher": medians["kd_online_bf16_teacher"] / medians["baseline"]}
           if "kd_online_bf16_teacher" in medians else {}),
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


# --------------------------------------------------------------------------------------------
# data loader throughput


def _phantom_datalist(folder: Path, cases: int, size: int) -> dict:
    from tools.phantom import write_dataset
    from tools.prepare import prepare

    with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the JSON result
        write_dataset(folder / "data", layout="brats2021", cases=cases, size=size, seed=0)
        return prepare(folder / "data", folder / "datalist.json", folds=2, seed=0)


def _bundle_parser(configs: Sequence[str], overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLES / "kd_student" / "configs" / c) for c in configs])
    parser.update({"bundle_root": str(BUNDLES / "kd_student"), **overrides})
    return parser


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
    return {"cache_fill_s": fill_s, "epoch_s": epoch_s, "loader_cases_per_s": cases / epoch_s,
            "batch_keys": sorted(keys)}


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


def loader(json: str | None = None, teacher_mode: str = "both", cases: int = 8, phantom_size: int = 96,
           spatial_size: int = 64, crop_size: int = 128, batch_size: int = 2, num_workers: int | None = None,
           cache_rate: float = 1.0, epochs: int = 3, steps: int = 4, filters: Sequence[int] = DEFAULT_FILTERS,
           threads: int | None = None) -> dict:
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
    result = {"benchmark": "loader", "cases": cases, "phantom_size": phantom_size, "spatial_size": list(spatial),
              "crop_size": list(_triple(crop_size)), "batch_size": batch_size, "cache_rate": cache_rate,
              "epochs": epochs, "filters": list(filters), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        datalist = _phantom_datalist(work, _positive("cases", cases), _positive("phantom_size", phantom_size))
        resolve = lambda c: {k: (os.path.join(datalist["dataset_dir"], v) if k in ("t1", "t1ce", "t2", "flair", "label") else v)  # noqa: E731
                             for k, v in c.items()}
        overrides = {
            "datalist": str(work / "datalist.json"),
            "train_datalist": [resolve(c) for c in datalist["training"]],  # every case trains
            "spatial_size": list(spatial), "crop_size": list(_triple(crop_size)), "filters": list(filters),
            "batch_size": batch_size, "cache_rate": cache_rate, "teacher_cache_dir": str(work / "cache"),
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


# --------------------------------------------------------------------------------------------
# single-case inference: our student vs the model zoo's SegResNet


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS record of this process (Linux ``clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def _peak_kb(resettable: bool) -> int:
    return _rss_kb("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _student_pipeline(case_dir: Path, case_id: str, options: dict):
    """The kd_student inference.json's preprocessing, network and postprocessing (without the file writer)."""
    parser = _bundle_parser(["inference.json"], {
        "input_dir": str(case_dir.parent), "device": options["device"], "amp": False,
        "crop_size": list(options["crop_size"]), "spatial_size": list(options["spatial_size"]),
        "filters": list(options["filters"]),
    })
    cases = parser.get_parsed_content("cases")
    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing")
    network = parser.get_parsed_content("network").eval()
    inferer = parser.get_parsed_content("inferer")
    case = next(c for c in cases if c["case_id"] == case_id)
    return case, preprocessing, network, inferer, postprocessing


def _zoo_label_map(regions):
    """The zoo's label map from its TC, WT, ET channels: ET -> 4, else TC -> 1, else WT -> 2."""
    import torch

    tc, wt, et = (regions[i:i + 1] > 0 for i in range(3))
    return torch.where(et, 4, torch.where(tc, 1, torch.where(wt, 2, 0)))


def _zoo_pipeline(case_dir: Path, case_id: str, options: dict):
    """MONAI model zoo brats_mri_segmentation inference, from its public settings (random weights)."""
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, Lambdad, LoadImaged, NormalizeIntensityd

    preprocessing = Compose([LoadImaged(keys="image"), NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    network = SegResNet(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4, out_channels=3,
                        dropout_prob=0.2).to(options["device"]).eval()
    inferer = SlidingWindowInferer(roi_size=options["zoo_roi"], sw_batch_size=1, overlap=0.5)
    postprocessing = Compose([
        Activationsd(keys="pred", sigmoid=True),
        Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", threshold=0.5),
        Lambdad(keys="pred", func=_zoo_label_map),
    ])
    modalities = ("flair", "t1", "t1ce", "t2")
    case = {"case_id": case_id, "image": [str(case_dir / f"{case_id}_{m}.nii.gz") for m in modalities]}
    return case, preprocessing, network, inferer, postprocessing


def _inference_worker(variant: str, case_dir: str, case_id: str, options: dict, repeats: int) -> dict:
    """In a fresh process: build ``variant``'s pipeline, run it ``1 + repeats`` times; seconds and peak memory."""
    import torch

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    build = _student_pipeline if variant == "student" else _zoo_pipeline
    case, preprocessing, network, inferer, postprocessing = build(Path(case_dir), case_id, options)
    device = torch.device(options["device"])
    cuda = device.type == "cuda"
    resettable = _reset_peak_rss()
    rss_before = _rss_kb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(1 + repeats):
        timing = {}
        start = time.perf_counter()
        data = preprocessing(dict(case))
        timing["preprocess_s"] = time.perf_counter() - start
        tic = time.perf_counter()
        autocast = torch.autocast("cuda") if cuda else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            data["pred"] = inferer(data["image"][None].to(device), network)[0]
        _sync(device)
        timing["network_s"] = time.perf_counter() - tic
        tic = time.perf_counter()
        data["pred"] = data["pred"].float().cpu()
        output = postprocessing(data)["pred"]
        timing["postprocess_s"] = time.perf_counter() - tic
        timing["total_s"] = time.perf_counter() - start
        runs.append(timing)
    peak_kb = _peak_kb(resettable)
    timed = runs[1:] if repeats else runs
    result = {key: _median([r[key] for r in timed]) for key in timed[0]}
    result.update({
        "input_shape": list(data["image"].shape),
        "output_shape": list(output.shape),
        "peak_rss_delta_mb": max(0, peak_kb - rss_before) / 1024,
        "peak_rss_method": "VmHWM after clear_refs" if resettable else "ru_maxrss (process lifetime peak)",
        "first_run_total_s": runs[0]["total_s"],
        "total_s_runs": [round(r["total_s"], 3) for r in timed],
    })
    if cuda:
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def inference(json: str | None = None, size: int = 240, device: str = "cpu", repeats: int = 3,
              crop_size: int = 128, spatial_size: int = 64, filters: Sequence[int] = DEFAULT_FILTERS,
              zoo_roi: Sequence[int] = ZOO_ROI, rounds: int = 1, threads: int | None = None) -> dict:
    """One phantom case (``tools.phantom.make_case(0, size)``, 240x240x155 at size 240): our student's
    inference (T1ce, crop, resize, network, invert) vs the model zoo's 4-channel SegResNet with its
    240x240x160 sliding window, each in a fresh process (clean peak memory), alternating ``rounds`` times.

    Reported per variant: median seconds of preprocessing (from NIfTI files), network, postprocessing
    and total over ``repeats`` runs after one warm-up, and the peak RSS increase during them (and
    ``torch.cuda.max_memory_allocated`` on CUDA). ``ratio_total_s`` < 1: ours is faster.
    """
    from tools.phantom import make_case, write_brats_case

    options = {"device": device, "crop_size": _triple(crop_size), "spatial_size": _triple(spatial_size),
               "filters": tuple(filters), "zoo_roi": _triple(zoo_roi), "threads": threads}
    repeats = int(repeats)
    results: dict[str, list[dict]] = {"student": [], "zoo": []}
    with tempfile.TemporaryDirectory() as tmp:
        case_id = write_brats_case(Path(tmp), "brats2021", make_case(0, size=_positive("size", size)), labeled=False)
        context = multiprocessing.get_context("spawn")
        for round_index in range(_positive("rounds", rounds)):
            order = ("student", "zoo") if round_index % 2 == 0 else ("zoo", "student")
            for variant in order:
                with context.Pool(1) as pool:
                    results[variant].append(pool.apply(_inference_worker, (variant, str(Path(tmp) / case_id), case_id, options, repeats)))
    summary = {}
    for variant, runs in results.items():
        merged = dict(runs[0])
        for key in ("preprocess_s", "network_s", "postprocess_s", "total_s", "peak_rss_delta_mb"):
            merged[key] = _median([r[key] for r in runs])
        summary[variant] = merged
    result = {
        "benchmark": "inference",
        "case_size": size,
        "student": summary["student"],
        "zoo_segresnet": summary["zoo"],
        "ratio_total_s": summary["student"]["total_s"] / summary["zoo"]["total_s"],
        "ratio_network_s": summary["student"]["network_s"] / summary["zoo"]["network_s"],
        "ratio_peak_rss": (summary["student"]["peak_rss_delta_mb"] / summary["zoo"]["peak_rss_delta_mb"]
                           if summary["zoo"]["peak_rss_delta_mb"] > 0 else None),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "repeats": repeats,
        "rounds": rounds,
        **environment(device),
    }
    return _write(json, result)


def main() -> None:
    fire.Fire(
        {"kd-overhead": kd_overhead, "loader": loader, "inference": inference},
        name="python -m tools.bench",
        serialize=lambda result: json.dumps(result, indent=2),
    )


if __name__ == "__main__":
    main()
