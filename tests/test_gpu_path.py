"""The GPU path (``brats_kd.device``, every bundle's ``configs/gpu.json``, the guard's mixed-precision rules,
``tools.experiment --device cuda``), exercised on the CPU: autocast in bfloat16 on the CPU, ``ToDeviced``
to ``cpu``, and a float16 ``GradScaler`` on the CPU (``torch.amp.GradScaler("cpu")``) for the guard.
What only a GPU can show (speed, cuDNN) is measured by ``tools/gpu_check.sh``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer

from brats_kd.device import (
    AutocastInferer,
    autocast_dtype,
    configure_backends,
    every_n_iterations,
    needs_grad_scaler,
    output_loss,
    rank_partition,
)
from brats_kd.guards import StopOnNonFiniteLoss, all_finite
from tests.bundle_runner import BUNDLES, TINY, bundle_config, config_paths, run_bundle

ENSEMBLE_TINY = {"roi_size": [32, 32, 32], "unet_features": [4, 4, 8, 8, 16, 4], "resunet_init_filters": 8,
                 "cascade_features": [4, 8], "num_workers": 0}
OMNI_TINY = {"roi_size": [32, 32, 32], "init_filters": 8, "num_workers": 0}
#: every training configuration of every bundle, merged with the bundle's gpu.json last
TRAIN_CONFIGS = {
    "teacher": [["train.json"], ["train.json", "baseline.json"]],
    "kd_student": [["train.json"], ["train.json", "cache_teacher.json"]],
    "ensemble": [["train.json", f"member_{m}.json"] for m in ("unet", "resunet", "cascade")],
    "omni_student": [["train.json"]],
}
EVALUATE_CONFIGS = {
    "teacher": [["train.json", "evaluate.json"]],
    "kd_student": [["train.json", "evaluate.json"]],
    "ensemble": [["train.json", "member_unet.json", "evaluate.json"], ["train.json", "evaluate.json", "evaluate_ensemble.json"]],
    "omni_student": [["train.json", "evaluate.json"]],
}


# ---------------------------------------------------------------------------------------------
# brats_kd.device


def test_autocast_dtype_is_bfloat16_on_the_cpu_and_the_scaler_only_for_float16_on_cuda():
    assert autocast_dtype("cpu") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda:0"), prefer="float16") is torch.float16
    with pytest.raises(ValueError, match="float16 autocast is not supported for training on the CPU"):
        autocast_dtype("cpu", prefer="float16")
    with pytest.raises(ValueError, match="prefer must be one of"):
        autocast_dtype("cpu", prefer="half")
    assert needs_grad_scaler("cuda:0", torch.float16)
    assert not needs_grad_scaler("cuda:0", torch.bfloat16)
    assert not needs_grad_scaler("cpu", torch.bfloat16)


@pytest.fixture
def restore_backends():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[0], saved[1]
    torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def test_configure_backends_turns_cudnn_benchmark_on_for_cuda_and_determinism_is_opt_in(restore_backends):
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True  # what set_determinism leaves
    assert configure_backends("cpu") == torch.device("cpu")
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True), "the CPU changes nothing"
    assert configure_backends("cuda:0") == torch.device("cuda:0")  # only flags: no GPU needed
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    assert not torch.are_deterministic_algorithms_enabled()
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    configure_backends("cuda:0", deterministic="true")  # as a command line passes it
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


class DtypeRecorder(torch.nn.Module):
    """A convolution that records the dtype its output had inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(2, 3, 3, padding=1)
        self.seen: list[torch.dtype] = []

    def forward(self, x):
        y = self.conv(x)
        self.seen.append(y.dtype)
        return y


@pytest.mark.parametrize("inner", [SimpleInferer(), SlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=2, overlap=0.5)])
def test_autocast_inferer_runs_the_network_in_bfloat16_and_returns_float32(inner):
    net = DtypeRecorder()
    x = torch.randn(1, 2, 12, 12, 12)
    reference = inner(x, net)
    calls = len(net.seen)
    out = AutocastInferer(inner, "bfloat16")(x, net)
    assert set(net.seen[:calls]) == {torch.float32} and set(net.seen[calls:]) == {torch.bfloat16}
    assert out.dtype is torch.float32
    assert not torch.equal(out, reference)  # it did run in reduced precision ...
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)  # ... and is close to float32
    out.sum().backward()  # outside autocast; the weights' gradients are float32
    assert net.conv.weight.grad.dtype is torch.float32 and bool(torch.isfinite(net.conv.weight.grad).all())
    net.seen.clear()
    AutocastInferer(inner, None)(x, net)
    assert set(net.seen) == {torch.float32}
    with pytest.raises(ValueError, match="dtype must be one of"):
        AutocastInferer(inner, "float64")


def test_autocast_inferer_casts_every_tensor_of_a_tuple_output():
    out = AutocastInferer(SimpleInferer(), torch.bfloat16)(torch.randn(1, 2, 4, 4, 4),
                                                           lambda x: (x * 2, x.sum(), torch.ones(1, dtype=torch.long)))
    assert [o.dtype for o in out] == [torch.float32, torch.float32, torch.long]


def test_rank_partition_gives_each_rank_its_own_cases_and_equal_lengths():
    cases = [{"case_id": f"c{i}"} for i in range(7)]
    assert rank_partition(cases) == cases  # not distributed: everything
    shares = [rank_partition(cases, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shares] == [4, 4]  # even_divisible: one case repeated
    assert {c["case_id"] for s in shares for c in s} == {c["case_id"] for c in cases}
    unique = [rank_partition(cases, seed=3, even_divisible=False, rank=r, world_size=3) for r in range(3)]
    ids = [c["case_id"] for s in unique for c in s]
    assert sorted(ids) == sorted(c["case_id"] for c in cases), "without even_divisible every case exactly once"
    assert shares == [rank_partition(cases, seed=3, rank=r, world_size=2) for r in range(2)], "same seed, same shares"
    with pytest.raises(ValueError, match="2 cases cannot be shared by 3 processes"):
        rank_partition(cases[:2], rank=0, world_size=3)
    with pytest.raises(ValueError, match="rank must be in"):
        rank_partition(cases, rank=2, world_size=2)


def test_every_n_iterations_and_output_loss():
    every = every_n_iterations(3)
    assert [i for i in range(1, 10) if every(None, i)] == [3, 6, 9]
    with pytest.raises(ValueError):
        every_n_iterations(0)
    loss = torch.tensor(0.5)
    assert output_loss({"loss": loss, "pred": None}) is loss
    assert output_loss([{"loss": 0.25}, {"loss": 0.25}]) == 0.25


# ---------------------------------------------------------------------------------------------
# the non-finite guard: one fused check, read every check_interval iterations, fp16-scaler aware


def fake_engine(network, loss=0.5, scaler=None):
    state = SimpleNamespace(epoch=1, iteration=0, output={"loss": torch.tensor(loss)})
    return SimpleNamespace(network=network, scaler=scaler, state=state)


def step(guard, engine, loss=None):
    engine.state.iteration += 1
    if loss is not None:
        engine.state.output = {"loss": torch.tensor(loss)}
    guard(engine)


def test_all_finite_folds_every_parameter_into_one_flag():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    assert bool(all_finite(list(net.parameters())))
    with torch.no_grad():
        net[1].bias[1] = float("inf")
    assert not bool(all_finite(list(net.parameters())))
    with torch.no_grad():
        net[1].bias[1] = float("nan")
    assert not bool(all_finite(list(net.parameters())))


def test_guard_reads_the_flags_every_check_interval_and_names_the_bad_weight():
    net = torch.nn.Linear(3, 2)
    guard, engine = StopOnNonFiniteLoss(check_interval=3), fake_engine(net)
    step(guard, engine)
    with torch.no_grad():
        net.weight[0, 1] = float("nan")
    step(guard, engine)  # iteration 2: poisoned, but not read yet
    message = "network weight 'weight' became NaN or infinite at epoch 1, between iterations 1 and 3"
    with pytest.raises(RuntimeError, match=message):
        step(guard, engine)


def test_guard_reads_the_flags_after_the_last_iteration_of_every_epoch_before_validation_and_the_savers():
    net = torch.nn.Linear(3, 2)
    guard, engine = StopOnNonFiniteLoss(check_interval=50), fake_engine(net)
    engine.state.epoch_length = 3
    step(guard, engine)
    step(guard, engine, loss=float("nan"))  # iteration 2: not read yet
    with pytest.raises(RuntimeError, match="training loss is NaN or infinite at epoch 1, between iterations 1 and 3"):
        step(guard, engine, loss=0.5)  # iteration 3 ends the epoch: read at ITERATION_COMPLETED, before EPOCH_COMPLETED


def test_guard_checks_at_epoch_completed_when_the_loader_has_no_length():
    guard, engine = StopOnNonFiniteLoss(check_interval=50), fake_engine(torch.nn.Linear(3, 2))
    step(guard, engine)
    step(guard, engine, loss=float("nan"))
    with pytest.raises(RuntimeError, match="training loss is NaN or infinite at epoch 1, between iterations 1 and 2"):
        guard.check(engine)  # what Events.EPOCH_COMPLETED runs


def test_guard_reports_the_loss_value_and_iteration_when_checking_every_step():
    guard, engine = StopOnNonFiniteLoss(), fake_engine(torch.nn.Linear(3, 2))
    step(guard, engine)
    with pytest.raises(RuntimeError, match="training loss is nan at epoch 1, iteration 2: stopping"):
        step(guard, engine, loss=float("nan"))


def scaler_step(net, scaler, grad_value):
    """One float16-style step: the scaled gradient is ``grad_value`` (inf = an overflow)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.zero_grad()
    scaler.scale(net(torch.ones(1, 3)).sum()).backward()
    for p in net.parameters():
        p.grad.fill_(grad_value)
    scaler.step(optimizer)
    scaler.update()


def test_an_overflow_step_of_the_float16_scaler_passes_and_a_collapsing_scale_stops():
    net = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    guard, engine = StopOnNonFiniteLoss(min_loss_scale=1.0), fake_engine(net, scaler=scaler)
    scaler_step(net, scaler, float("inf"))  # the scaler skips the step on purpose and halves its scale
    assert all(torch.equal(b, p) for b, p in zip(before, net.parameters())), "skipped: weights unchanged"
    step(guard, engine)  # finite loss, finite weights, scale 2: training goes on
    assert scaler.get_scale() == 2.0
    scaler_step(net, scaler, float("inf"))
    scaler_step(net, scaler, float("inf"))  # scale 0.5: every step overflows
    with pytest.raises(RuntimeError, match="loss scale fell to 0.5 at epoch 1, iteration 2 .below 1.*train in bfloat16"):
        step(guard, engine)


# ---------------------------------------------------------------------------------------------
# the frozen teacher under inference_mode and autocast


def test_frozen_teacher_in_inference_mode_and_bfloat16_gives_float32_targets_autograd_can_save(tmp_path):
    from brats_kd.networks import EncoderDecoder
    from brats_kd.teacher import FrozenTeacher

    filters = (4, 8, 16, 32, 64)
    torch.manual_seed(0)
    torch.save({"model": EncoderDecoder(4, 3, filters=filters).state_dict()}, tmp_path / "t.pt")
    image = torch.randn(2, 4, 32, 32, 32)
    plain = FrozenTeacher(EncoderDecoder(4, 3, filters=filters), tmp_path / "t.pt")
    fast = FrozenTeacher(EncoderDecoder(4, 3, filters=filters), tmp_path / "t.pt", autocast_dtype="bfloat16", inference_mode=True)
    plain.load("cpu")
    fast.load("cpu")
    ref_logits, ref_bottleneck = plain.infer(image)
    logits, bottleneck = fast.infer(image)
    assert logits.dtype is bottleneck.dtype is torch.float32
    assert not logits.is_inference() and not bottleneck.is_inference()
    assert not torch.equal(logits, ref_logits)
    torch.testing.assert_close(logits, ref_logits, atol=0.1, rtol=0.05)
    student = torch.randn_like(logits, requires_grad=True)
    (student * logits).sum().backward()  # mul saves `logits` for the backward: an inference tensor would fail here
    assert torch.equal(student.grad, logits)
    with pytest.raises(ValueError, match="autocast_dtype must be"):
        FrozenTeacher(EncoderDecoder(4, 3, filters=filters), tmp_path / "t.pt", autocast_dtype="half")
    assert ref_bottleneck.shape == bottleneck.shape


# ---------------------------------------------------------------------------------------------
# every bundle's gpu.json


def bundle_overrides(bundle: str, datalist) -> dict:
    tiny = {"ensemble": ENSEMBLE_TINY, "omni_student": OMNI_TINY}.get(bundle, TINY)
    return dict(tiny, datalist=str(datalist), device="cpu")


@pytest.mark.parametrize("bundle, configs", [(b, c) for b, cs in TRAIN_CONFIGS.items() for c in cs])
def test_every_training_config_merged_with_gpu_json_has_the_workflow_properties_and_the_fast_path(bundle, configs, datalist):
    from monai.bundle import ConfigWorkflow

    files = config_paths(bundle, [*configs, "gpu.json"])
    workflow = ConfigWorkflow(config_file=files, workflow_type="train", bundle_root=str(BUNDLES / bundle), datalist=str(datalist))
    workflow.initialize()
    assert not workflow.check_properties(), f"missing workflow properties: {workflow.check_properties()}"
    parser = bundle_config(bundle, [*configs, "gpu.json"], **bundle_overrides(bundle, datalist))
    raw = parser.config
    handlers = [h.get("_target_") if isinstance(h, dict) else h for h in raw["train"]["handlers"]]
    guard = handlers.index("brats_kd.guards.StopOnNonFiniteLoss")
    # gpu.json addresses the handlers by position: those positions must hold what it means
    assert raw["train"]["handlers"][guard]["check_interval"] == "@log_interval"
    for i, target in enumerate(handlers):
        if target in ("StatsHandler", "TensorBoardStatsHandler"):
            assert raw["train"]["handlers"][i]["iteration_log"]["_target_"] == "brats_kd.device.every_n_iterations", (i, target)
    if "cache_teacher.json" in configs:
        assert parser.get_parsed_content("train#frozen_teacher").autocast_dtype is torch.bfloat16
        return
    assert parser.get_parsed_content("amp_dtype") is torch.bfloat16 and parser.get_parsed_content("amp") is False
    trainer = parser.get_parsed_content("train#trainer")
    assert isinstance(trainer.inferer, AutocastInferer) and trainer.inferer.dtype is torch.bfloat16
    assert type(trainer.data_loader).__name__ == "ThreadDataLoader"
    names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
    assert "ToDeviced" in names
    if bundle in ("ensemble", "omni_student"):
        # the indices are computed before the crop (cached), the patch moved after it, the affine on the device
        assert names.index("FgBgToIndicesd") < names.index("RandCropByPosNegLabeld") < names.index("ToDeviced")
        assert names.index("ToDeviced") < names.index("RandAffined")
        crop = parser.get_parsed_content("train#preprocessing").transforms[names.index("RandCropByPosNegLabeld")]
        assert crop.fg_indices_key.endswith("_fg_indices") and crop.bg_indices_key.endswith("_bg_indices")
        affine = parser.get_parsed_content("train#preprocessing").transforms[names.index("RandAffined")]
        assert str(affine.rand_affine.rand_affine_grid.device) == "cpu", "the grid is made where the patch is"
    else:
        assert names.index("ToDeviced") < names.index("RandFlipd")
    if bundle == "kd_student":
        teacher = parser.get_parsed_content("train#frozen_teacher")
        assert teacher.inference_mode and teacher.autocast_dtype is torch.bfloat16


@pytest.mark.parametrize("bundle, configs", [(b, c) for b, cs in EVALUATE_CONFIGS.items() for c in cs])
def test_every_evaluation_config_merged_with_gpu_json_keeps_its_data_and_runs_autocast(bundle, configs, datalist):
    parser = bundle_config(bundle, [*configs, "gpu.json"], **bundle_overrides(bundle, datalist))
    evaluator = parser.config["validate"]["evaluator"]
    assert parser.config["validate"]["dataset"]["data"] == "$@case_guard.usable()", "gpu.json must not replace the test cases"
    assert evaluator["device"]["_target_"] == "brats_kd.device.configure_backends"
    inferer = parser.get_parsed_content("validate#inferer")
    assert isinstance(inferer, AutocastInferer)
    if bundle in ("ensemble", "omni_student"):
        assert isinstance(inferer.inferer, SlidingWindowInferer) and inferer.inferer.sw_batch_size == 4


@pytest.mark.slow
def test_the_teacher_and_the_online_student_train_an_epoch_on_the_cpu_with_gpu_json(datalist, trained_teacher, tmp_path):
    """device cpu: bfloat16 autocast on the CPU, the data cached 'on the device', the ThreadDataLoader, the guard
    every 2 iterations, the frozen teacher in inference_mode."""
    common = dict(TINY, datalist=str(datalist), epochs=1, device="cpu", log_interval=2)
    teacher = run_bundle("teacher", ["train.json", "gpu.json"], cwd=tmp_path, ckpt_dir=str(tmp_path / "t"),
                         output_dir=str(tmp_path / "tr"), **common)
    assert (tmp_path / "t" / "model.pt").is_file() and (tmp_path / "t" / "checkpoint.pt").is_file()
    checkpoint = torch.load(tmp_path / "t" / "checkpoint.pt", map_location="cpu", weights_only=True)
    iterations = checkpoint["trainer"]["iteration"]
    assert iterations >= 2
    logged = [line for line in teacher.stdout.splitlines() if "Iter: " in line]
    assert len(logged) == iterations // 2 and all("train_loss: " in line for line in logged), logged
    student = run_bundle("kd_student", ["train.json", "gpu.json"], cwd=tmp_path, ckpt_dir=str(tmp_path / "s"),
                         output_dir=str(tmp_path / "sr"), teacher_ckpt=str(trained_teacher / "model.pt"), **common)
    assert (tmp_path / "s" / "model.pt").is_file()
    assert "loss_kd: " in student.stdout and "loss_kl: " in student.stdout


# ---------------------------------------------------------------------------------------------
# tools.experiment --device cuda


def test_experiment_device_cuda_merges_gpu_json_into_every_stage_built_on_train_json(tmp_path):
    from tools.experiment import GPU_CONFIG, KDNET_MODELS, check_device, model_stages, use_gpu_configs
    from tools.presets import get_preset

    stages = [s for m in KDNET_MODELS for s in model_stages(m, tmp_path, 0, tmp_path / "d.json", get_preset("smoke"), 0, {})]
    stages.append(SimpleNamespace(name="pseudo", configs=["configs/inference.json", "configs/pseudo_label.json"]))
    assert use_gpu_configs(stages, None) is stages and all(GPU_CONFIG not in s.configs for s in stages)
    use_gpu_configs(stages, "cuda")
    for stage in stages[:-1]:
        assert stage.configs[-1] == GPU_CONFIG and stage.configs.count(GPU_CONFIG) == 1, stage.name
    assert GPU_CONFIG not in stages[-1].configs
    use_gpu_configs(stages, "cuda")
    assert all(s.configs.count(GPU_CONFIG) <= 1 for s in stages)
    with pytest.raises(ValueError, match="--device must be cuda"):
        check_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here"):
            check_device("cuda")


def test_gpu_json_files_are_valid_json_with_the_documented_keys():
    for bundle in TRAIN_CONFIGS:
        config = json.loads((BUNDLES / bundle / "configs" / "gpu.json").read_text())
        for key in ("amp_dtype", "amp", "deterministic", "log_interval", "train#dataloader", "train#inferer", "validate#inferer"):
            assert key in config, (bundle, key)
        assert ("compile" in config) == (bundle != "kd_student"), "KDTrainer refuses compile"
        assert Path(BUNDLES / bundle / "configs" / "train.json").is_file()


# ---------------------------------------------------------------------------------------------
# tools/gpu_check.sh

GPU_CHECK = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.sh"


def gpu_check(out: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(GPU_CHECK), str(out)], env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_stops_at_once_without_cuda(tmp_path):
    proc = gpu_check(tmp_path / "out", GPU_CHECK_DEVICE="cuda")
    assert proc.returncode == 3
    assert "CUDA is not available" in proc.stderr and "GPU_CHECK_DEVICE=cpu" in proc.stderr
    assert not (tmp_path / "out").exists(), "nothing is written before the check"
    assert gpu_check(tmp_path / "out", GPU_CHECK_DEVICE="tpu").returncode == 2


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_is_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(GPU_CHECK)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.slow
def test_gpu_check_dry_run_of_the_throughput_step_writes_its_json_and_the_summary(tmp_path):
    """The CPU dry run (GPU_CHECK_DEVICE=cpu: tiny sizes) of one step, as the script runs it on the GPU."""
    proc = gpu_check(tmp_path / "out", GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="throughput")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["all_ok"] is True
    assert list(summary["steps"]) == ["throughput_16"] and summary["steps"]["throughput_16"]["exit"] == 0
    result = json.loads((tmp_path / "out" / "throughput_16.json").read_text())
    assert set(result["models"]) == {"teacher", "baseline", "student_online", "student_cached", "teacher_copy"}
    assert result["spatial_size"] == [16, 16, 16] and result["device"] == "cpu"


@pytest.mark.slow
def test_with_gpu_json_a_nan_gradient_stops_the_run_before_validation_writes_a_model(datalist, tmp_path):
    """log_interval 20 > the epoch's 2 iterations: the guard must still read its flags at the epoch's last
    iteration, before ValidationHandler's best-model saver (EPOCH_COMPLETED) could save the NaN weights."""
    fault = Path(__file__).resolve().parent / "reliability_faults" / "nan_gradient.json"
    proc = run_bundle("teacher", ["train.json", "gpu.json", str(fault)], cwd=tmp_path, check=False, **TINY,
                      datalist=str(datalist), epochs=1, device="cpu", fault_at=1, ckpt_dir=str(tmp_path / "m"),
                      output_dir=str(tmp_path / "r"))
    assert proc.returncode != 0
    assert "NaN or infinite at epoch 1, between iterations 1 and " in proc.stdout
    assert not list((tmp_path / "m").glob("*.pt")), "no checkpoint of the poisoned epoch"
