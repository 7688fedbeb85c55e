"""Smoke tests of ``tools.bench``'s three commands with tiny sizes: the CLI runs, writes its JSON with
the documented keys, and every time and ratio is a positive number. No timing is asserted: the
figures come from the benchmarks themselves, on an idle machine (docs/performance.md).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["--filters", "[4,8,16,32,64]", "--spatial-size", "32"]


def run_bench(tmp_path: Path, command: str, *args: str) -> dict:
    out = tmp_path / f"{command}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny tensors: one thread is quicker on a shared machine
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", command, "--json", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result  # stdout carries the same JSON
    return result


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_environment(result: dict) -> None:
    for key in ("device", "threads", "loadavg", "torch", "monai", "python", "cpu_count"):
        assert key in result, key
    assert result["threads"] == 1


@pytest.mark.slow
def test_kd_overhead_reports_the_three_step_times_and_their_ratios(tmp_path):
    result = run_bench(tmp_path, "kd-overhead", *TINY_NET, "--steps", "2", "--warmup", "1", "--block", "1")
    for key in ("baseline_step_s", "kd_online_step_s", "kd_cached_step_s", "teacher_forward_s", "ratio_online", "ratio_cached",
                "ratio_baseline_copy", "ratio_online_bf16_teacher"):
        assert positive(result[key]), key
    assert result["ratio_online"] == pytest.approx(result["kd_online_step_s"] / result["baseline_step_s"])
    assert result["ratio_cached"] == pytest.approx(result["kd_cached_step_s"] / result["baseline_step_s"])
    assert result["spatial_size"] == [32, 32, 32] and result["batch_size"] == 2 and result["steps"] == 2
    assert {name: len(times) for name, times in result["step_times_s"].items()} == {
        "baseline": 2, "kd_online": 2, "kd_cached": 2, "teacher_forward": 2, "baseline_copy": 2, "kd_online_bf16_teacher": 2,
    }
    check_environment(result)


@pytest.mark.slow
def test_loader_reports_delivered_and_consumed_cases_per_second_in_both_modes(tmp_path):
    result = run_bench(
        tmp_path, "loader", *TINY_NET, "--cases", "3", "--phantom-size", "32", "--crop-size", "32",
        "--epochs", "1", "--steps", "1", "--num-workers", "0",
    )
    assert set(result["modes"]) == {"online", "cached"}
    for mode, entry in result["modes"].items():
        for key in ("cache_fill_s", "epoch_s", "loader_cases_per_s", "train_step_s", "train_cases_per_s", "headroom"):
            assert positive(entry[key]), (mode, key)
    assert "teacher_image" in result["modes"]["online"]["batch_keys"]
    cached_keys = result["modes"]["cached"]["batch_keys"]
    assert {"teacher_logits", "teacher_bottleneck"} <= set(cached_keys) and "teacher_image" not in cached_keys
    assert positive(result["modes"]["cached"]["cache_build_s"])
    check_environment(result)


@pytest.mark.slow
def test_inference_reports_seconds_and_peak_memory_of_student_and_zoo(tmp_path):
    result = run_bench(
        tmp_path, "inference", *TINY_NET, "--size", "32", "--crop-size", "32", "--zoo-roi", "[32,32,24]", "--repeats", "1",
        "--threads", "1",
    )
    for variant in ("student", "zoo_segresnet"):
        for key in ("preprocess_s", "network_s", "postprocess_s", "total_s", "peak_rss_delta_mb"):
            assert positive(result[variant][key]), (variant, key)
    # both end with a label map in the case's original geometry (32 x 32 x 21 at phantom size 32)
    assert result["student"]["output_shape"] == result["zoo_segresnet"]["output_shape"] == [1, 32, 32, 21]
    assert result["zoo_segresnet"]["input_shape"][0] == 4 and result["student"]["input_shape"][0] == 1
    for key in ("ratio_total_s", "ratio_network_s", "ratio_peak_rss"):
        assert positive(result[key]), key
    check_environment(result)


MODELS = ("teacher", "baseline", "student_online", "student_cached", "teacher_copy")


@pytest.mark.slow
@pytest.mark.parametrize("gpu_config", ["false", "true"])
def test_train_throughput_reports_every_model_with_data_wait_and_peak_memory(tmp_path, gpu_config):
    """16³ input, 2 timed steps per model; ``--gpu-config true`` runs the GPU path on the CPU (bfloat16 autocast,
    data cached 'on the device', ThreadDataLoader)."""
    result = run_bench(
        tmp_path, "train-throughput", "--spatial-size", "16", "--filters", "[4,8,16,32]", "--steps", "2", "--warmup", "1",
        "--block", "2", "--cases", "8", "--num-workers", "0", "--gpu-config", gpu_config,
    )
    assert set(result["models"]) == set(MODELS)
    for name, entry in result["models"].items():
        for key in ("samples_per_s", "step_s", "peak_memory_mb", "cache_fill_s"):
            assert positive(entry[key]), (name, key)
        assert entry["samples_per_s"] == pytest.approx(2 / entry["step_s"])
        assert 0 <= entry["data_wait_fraction"] < 1 and entry["data_wait_s"] >= 0, name
        assert len(entry["step_times_s"]) == 2 and entry["steps_per_epoch"] == 4, name  # 8 cases, batch 2
        assert entry["amp_dtype"] == ("torch.bfloat16" if gpu_config == "true" else None), name
    models = result["models"]
    ratios = {"ratio_student_online": ("student_online", "baseline"), "ratio_student_cached": ("student_cached", "baseline"),
              "ratio_teacher_copy": ("teacher_copy", "teacher")}
    for key, (num, den) in ratios.items():
        assert result[key] == pytest.approx(models[num]["step_s"] / models[den]["step_s"]), key
    assert result["gpu_config"] is (gpu_config == "true") and result["spatial_size"] == [16, 16, 16]
    assert result["memory_method"].startswith(("VmHWM", "VmRSS sampled"))
    check_environment(result)


@pytest.mark.slow
def test_cpu_kernels_reports_both_batch_paths_and_layouts_of_every_network(tmp_path):
    result = run_bench(tmp_path, "cpu-kernels", "--steps", "1", "--warmup", "1")
    assert set(result["networks"]) == {"kdnet_encoder_decoder", "ensemble_unet", "ensemble_resunet", "ensemble_cascade"}
    for name, row in result["networks"].items():
        for key in ("infer_s_per_sample_batch1", "infer_s_per_sample_batch2", "train_step_s_contiguous",
                    "train_step_s_channels_last"):
            assert positive(row[key]), (name, key)
        assert row["train_contiguous_over_channels_last"] == pytest.approx(
            row["train_step_s_contiguous"] / row["train_step_s_channels_last"], rel=0.02)
        # the premise of val_batch_size / sw_batch_size: one 32³ sample runs PyTorch's native kernel, two run oneDNN
        assert row["slow_conv3d_calls_batch1"] > row["slow_conv3d_calls_batch2"], name
    check_environment(result)


def test_rss_sampler_sees_a_peak_inside_its_block_after_a_higher_lifetime_peak():
    """Where /proc/self/clear_refs cannot reset the kernel's peak, the benchmarks sample VmRSS instead of reading
    ru_maxrss, whose lifetime peak can lie before the measured block and report an increase of 0."""
    import numpy as np

    from tools.bench.inference import RssSampler, _rss_kb

    earlier = np.ones(64 * 2**20 // 8)  # a lifetime peak before the block ...
    del earlier
    before = _rss_kb("VmRSS")
    with RssSampler(interval_s=0.001) as sampler:
        block = np.ones(48 * 2**20 // 8)  # ... higher than what the block allocates
        time.sleep(0.05)
        del block
    assert sampler.peak_kb - before > 40 * 1024, (before, sampler.peak_kb)
    assert _rss_kb("VmRSS") - before < 40 * 1024, "the block's memory was returned: only a sampled peak shows it"


@pytest.mark.parametrize("resettable", [True, False])
def test_block_peak_rss_sees_the_block_either_way_and_names_its_method(resettable, monkeypatch):
    """Both benchmarks measure a block through BlockPeakRss: VmHWM after clear_refs, or the sampler where the
    kernel's peak cannot be reset (forced here)."""
    import numpy as np

    import tools.bench.inference as inference

    if not resettable:
        monkeypatch.setattr(inference, "_reset_peak_rss", lambda: False)
    elif not inference._reset_peak_rss():
        pytest.skip("/proc/self/clear_refs cannot be written here")
    before = inference._rss_kb("VmRSS")
    with inference.BlockPeakRss() as rss:
        block = np.ones(48 * 2**20 // 8)
        time.sleep(0.05)
        del block
    assert rss.peak_kb - before > 40 * 1024, (before, rss.peak_kb)
    expected = "VmHWM after clear_refs (process RSS)" if resettable else "VmRSS sampled every 2 ms (a lower bound)"
    assert rss.method == expected
