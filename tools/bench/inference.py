"""``inference``: one full-size case through the student vs the model zoo's SegResNet (time, peak memory)."""

from __future__ import annotations

import contextlib
import multiprocessing
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tools.bench.common import (
    DEFAULT_FILTERS,
    ZOO_ROI,
    _bundle_parser,
    _median,
    _positive,
    _sync,
    _triple,
    _write,
    environment,
)

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


class RssSampler:
    """The peak of this process's resident memory (``VmRSS``) while the ``with`` block runs, read every
    ``interval_s`` by a thread: where ``clear_refs`` cannot reset the kernel's peak (``VmHWM``), the process's
    lifetime peak (``ru_maxrss``) may lie before the block (imports, model building) and hide the block's own
    peak. A spike shorter than the interval can be missed, so this is a lower bound."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak_kb = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, _rss_kb("VmRSS"))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self.peak_kb = _rss_kb("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _rss_kb("VmRSS"))


class BlockPeakRss:
    """This process's peak resident memory (kB, ``peak_kb``) during the ``with`` block: the kernel's ``VmHWM``
    after resetting it (``clear_refs``) or, where it cannot be reset, ``VmRSS`` sampled by :class:`RssSampler`
    (a lower bound). ``method`` says which, for the benchmark's JSON."""

    def __enter__(self) -> BlockPeakRss:
        self.resettable = _reset_peak_rss()
        self._sampler = None if self.resettable else RssSampler().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._sampler is None:
            self.peak_kb = _rss_kb("VmHWM")
        else:
            self._sampler.__exit__(*exc)
            self.peak_kb = self._sampler.peak_kb

    @property
    def method(self) -> str:
        if self.resettable:
            return "VmHWM after clear_refs (process RSS)"
        return f"VmRSS sampled every {self._sampler.interval_s * 1000:g} ms (a lower bound)"


def _student_pipeline(case_dir: Path, case_id: str, options: dict):
    """The kd_student inference.json's preprocessing, network and postprocessing (without the file writer)."""
    parser = _bundle_parser(
        ["inference.json"],
        {
            "input_dir": str(case_dir.parent),
            "device": options["device"],
            "amp": False,
            "crop_size": list(options["crop_size"]),
            "spatial_size": list(options["spatial_size"]),
            "filters": list(options["filters"]),
        },
    )
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

    tc, wt, et = (regions[i : i + 1] > 0 for i in range(3))
    return torch.where(et, 4, torch.where(tc, 1, torch.where(wt, 2, 0)))


def _zoo_pipeline(case_dir: Path, case_id: str, options: dict):
    """MONAI model zoo brats_mri_segmentation inference, from its public settings (random weights)."""
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNet
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, Lambdad, LoadImaged, NormalizeIntensityd

    preprocessing = Compose([LoadImaged(keys="image"), NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True)])
    network = (
        SegResNet(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2)
        .to(options["device"])
        .eval()
    )
    inferer = SlidingWindowInferer(roi_size=options["zoo_roi"], sw_batch_size=1, overlap=0.5)
    postprocessing = Compose(
        [
            Activationsd(keys="pred", sigmoid=True),
            Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            AsDiscreted(keys="pred", threshold=0.5),
            Lambdad(keys="pred", func=_zoo_label_map),
        ]
    )
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
    rss_before = _rss_kb("VmRSS")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with BlockPeakRss() as rss:
        runs, data, output = _timed_runs(1 + repeats, case, preprocessing, network, inferer, postprocessing, device)
    timed = runs[1:] if repeats else runs
    result = {key: _median([r[key] for r in timed]) for key in timed[0]}
    result.update(
        {
            "input_shape": list(data["image"].shape),
            "output_shape": list(output.shape),
            "peak_rss_delta_mb": max(0, rss.peak_kb - rss_before) / 1024,
            "peak_rss_method": rss.method,
            "first_run_total_s": runs[0]["total_s"],
            "total_s_runs": [round(r["total_s"], 3) for r in timed],
        }
    )
    if cuda:
        result["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _timed_runs(count: int, case, preprocessing, network, inferer, postprocessing, device) -> tuple[list[dict], dict, object]:
    """``count`` runs of the whole pipeline on ``case``: their timings, and the last run's data and label map."""
    import torch

    cuda = device.type == "cuda"
    runs = []
    for _ in range(count):
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
    return runs, data, output


def inference(
    json: str | None = None,
    size: int = 240,
    device: str = "cpu",
    repeats: int = 3,
    crop_size: int = 128,
    spatial_size: int = 64,
    filters: Sequence[int] = DEFAULT_FILTERS,
    zoo_roi: Sequence[int] = ZOO_ROI,
    rounds: int = 1,
    threads: int | None = None,
) -> dict:
    """One phantom case (``tools.phantom.make_case(0, size)``, 240x240x155 at size 240): our student's
    inference (T1ce, crop, resize, network, invert) vs the model zoo's 4-channel SegResNet with its
    240x240x160 sliding window, each in a fresh process (clean peak memory), alternating ``rounds`` times.

    Reported per variant: median seconds of preprocessing (from NIfTI files), network, postprocessing
    and total over ``repeats`` runs after one warm-up, and the peak RSS increase during them (and
    ``torch.cuda.max_memory_allocated`` on CUDA). ``ratio_total_s`` < 1: ours is faster.
    """
    from tools.phantom import make_case, write_brats_case

    options = {
        "device": device,
        "crop_size": _triple(crop_size),
        "spatial_size": _triple(spatial_size),
        "filters": tuple(filters),
        "zoo_roi": _triple(zoo_roi),
        "threads": threads,
    }
    repeats = int(repeats)
    results: dict[str, list[dict]] = {"student": [], "zoo": []}
    with tempfile.TemporaryDirectory() as tmp:
        case_id = write_brats_case(Path(tmp), "brats2021", make_case(0, size=_positive("size", size)), labeled=False)
        context = multiprocessing.get_context("spawn")
        for round_index in range(_positive("rounds", rounds)):
            order = ("student", "zoo") if round_index % 2 == 0 else ("zoo", "student")
            for variant in order:
                with context.Pool(1) as pool:
                    results[variant].append(
                        pool.apply(_inference_worker, (variant, str(Path(tmp) / case_id), case_id, options, repeats))
                    )
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
        "ratio_peak_rss": (
            summary["student"]["peak_rss_delta_mb"] / summary["zoo"]["peak_rss_delta_mb"]
            if summary["zoo"]["peak_rss_delta_mb"] > 0
            else None
        ),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "repeats": repeats,
        "rounds": rounds,
        **environment(device),
    }
    return _write(json, result)


