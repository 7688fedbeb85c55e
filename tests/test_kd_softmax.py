"""The softmax head (config value ``activation: softmax``, KD-Net's Eq. 1 as written) next to the default
sigmoid head: the losses of each mode against hand computations, the class/region/label-map conversions,
the teacher's checkpoint record and the student's refusal of a teacher of the other head or other
modalities, the zoo checks (``verify_net_in_out`` with its defaults, TorchScript / ONNX export) with the
softmax overrides, ``tools.experiment --activation``, and teacher and student trained, evaluated and run
for inference in softmax mode through ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.losses import DiceFocalLoss
from monai.transforms import AsDiscrete, ConvertToMultiChannelBasedOnBratsClasses

from brats_kd.labels import regions_to_brats_labels
from brats_kd.losses import GTLoss, KDLoss
from brats_kd.regions import (
    CLASS_LABELS,
    ProbabilitiesToBratsLabelsd,
    classes_to_regions,
    head_channels,
    probabilities_to_brats_labels,
    probabilities_to_regions,
    regions_to_classes,
)
from brats_kd.teacher import CheckpointRecord, FrozenTeacher, check_teacher_record
from tests.bundle_runner import BUNDLES, TINY, bundle_config, run_bundle
from tests.test_kd_bundle import logged_terms, student_overrides
from tests.test_teacher_bundle import REGION_LABELS, assert_label_map_like, dice_of_region, read_raw_csv

MODALITIES = ["t1", "t1ce", "t2", "flair"]
EPS = 1e-5  # smooth_nr = smooth_dr of every Dice here


def _softmax(values: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _dice(p: list[float], s: list[float], soft_label: bool) -> float:
    if soft_label:  # |p ∩ s| = (|p| + |s| - |p - s|) / 2 (Wang et al. 2023)
        return (sum(p) + sum(s) - sum(abs(a - b) for a, b in zip(p, s)) + EPS) / (sum(p) + sum(s) + EPS)
    return (2 * sum(a * b for a, b in zip(p, s)) + EPS) / (sum(p) + sum(s) + EPS)


# ---------------------------------------------------------------------------------------------
# KDLoss, softmax mode (Eq. 1-2 with softmax over the classes)

# one sample, 3 classes, 2 voxels; teacher argmax: class 0 at voxel 0, class 1 at voxel 1
TEACHER = [[2.0, 0.0], [0.0, 4.0], [-2.0, 0.0]]  # [class][voxel]
STUDENT = [[0.0, math.log(2.0)], [0.0, 0.0], [0.0, 0.0]]


def _as_tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).unsqueeze(0)  # [1, C, voxels]


def _hand_softmax_kd(temperature: float, student_temperature: float, soft_label: bool, squared: bool) -> float:
    voxels = range(len(TEACHER[0]))
    s_by_voxel = [_softmax([c[v] for c in TEACHER], temperature) for v in voxels]
    p_by_voxel = [_softmax([c[v] for c in STUDENT], student_temperature) for v in voxels]
    classes = range(len(TEACHER))
    dice = sum(
        _dice([p_by_voxel[v][c] for v in voxels], [s_by_voxel[v][c] for v in voxels], soft_label) for c in classes
    ) / len(TEACHER)
    hard = [max(classes, key=lambda c, v=v: TEACHER[c][v]) for v in voxels]
    cross_entropy = sum(-math.log(p_by_voxel[v][hard[v]]) for v in voxels) / len(voxels)
    weight = temperature * student_temperature if squared else 1.0
    return weight * (1.0 - dice) + cross_entropy


@pytest.mark.parametrize("soft_label", [False, True], ids=["classical", "soft_label"])
def test_softmax_kd_loss_by_hand(soft_label):
    """s = softmax(f_t / T) over the classes, p = softmax(f_s), L = (1 - Dice(s, p)) + CE(argmax f_t, p)."""
    loss = KDLoss(temperature=2.0, soft_label=soft_label, activation="softmax")(_as_tensor(STUDENT), _as_tensor(TEACHER))
    assert loss.item() == pytest.approx(_hand_softmax_kd(2.0, 1.0, soft_label, squared=False), rel=1e-6)


@pytest.mark.parametrize("soft_label", [False, True], ids=["classical", "soft_label"])
def test_softmax_kd_loss_with_student_temperature_and_t_squared_by_hand(soft_label):
    """Hinton et al.'s variant in softmax mode: both sides at T, the soft term times T * T_s, the CE on f_s / T_s."""
    kd = KDLoss(temperature=2.0, student_temperature=2.0, soft_label=soft_label, temperature_squared=True, activation="softmax")
    loss = kd(_as_tensor(STUDENT), _as_tensor(TEACHER))
    assert loss.item() == pytest.approx(_hand_softmax_kd(2.0, 2.0, soft_label, squared=True), rel=1e-6)


def test_sigmoid_mode_is_the_default_and_differs_from_softmax():
    student, teacher = _as_tensor(STUDENT), _as_tensor(TEACHER)
    default, sigmoid = KDLoss(temperature=2.0), KDLoss(temperature=2.0, activation="sigmoid")
    assert default(student, teacher).item() == sigmoid(student, teacher).item()
    # sigmoid mode by hand on the same tensors: per-channel Bernoulli soft labels, BCE to f_t > 0
    s = [[_sigmoid(t / 2.0) for t in row] for row in TEACHER]
    p = [[_sigmoid(x) for x in row] for row in STUDENT]
    dice = sum(_dice(p[c], s[c], soft_label=False) for c in range(3)) / 3
    bce = [
        -math.log(p[c][v]) if TEACHER[c][v] > 0 else -math.log(1 - p[c][v]) for c in range(3) for v in range(2)
    ]
    expected = (1 - dice) + sum(bce) / len(bce)
    assert KDLoss(temperature=2.0)(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    assert KDLoss(temperature=2.0, activation="softmax")(student, teacher).item() != pytest.approx(expected, rel=1e-3)


def test_softmax_kd_loss_saturated_logits_are_finite_and_the_teacher_is_fixed():
    gen = torch.Generator().manual_seed(0)
    student = ((torch.randint(0, 2, (2, 4, 4, 4, 4), generator=gen).float() * 2 - 1) * 50).requires_grad_(True)
    teacher = ((torch.randint(0, 2, (2, 4, 4, 4, 4), generator=gen).float() * 2 - 1) * 50).requires_grad_(True)
    loss = KDLoss(temperature=5.0, soft_label=True, activation="softmax")(student, teacher)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_kd_loss_argument_checks():
    with pytest.raises(ValueError, match="activation must be one of"):
        KDLoss(activation="tanh")
    with pytest.raises(ValueError, match="at least 2 class channels"):
        KDLoss(activation="softmax")(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------------
# GTLoss (L_GT, Eq. 4)


def test_gt_loss_softmax_is_dice_plus_cross_entropy_on_the_classes_by_hand():
    # 3 voxels of classes background, edema, enhancing, given as the bundles' TC/WT/ET region label
    regions = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]).unsqueeze(0)  # [1, 3, 3]
    logits_rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [-1.0, 0.0, 3.0]]  # [class][voxel]
    classes = [0, 2, 3]
    p = [_softmax([row[v] for row in logits_rows]) for v in range(3)]  # [voxel][class]
    q = [[1.0 if classes[v] == c else 0.0 for v in range(3)] for c in range(4)]
    dice = sum(_dice([p[v][c] for v in range(3)], q[c], soft_label=False) for c in range(4)) / 4
    cross_entropy = sum(-math.log(p[v][classes[v]]) for v in range(3)) / 3
    loss = GTLoss(activation="softmax")
    logits = _as_tensor(logits_rows)
    assert loss(logits, regions).item() == pytest.approx((1 - dice) + cross_entropy, rel=1e-6)
    # class indices directly (BraTS 0/2/4 as classes 0/2/3) give the same value
    assert loss(logits, torch.tensor([[[0.0, 2.0, 3.0]]])).item() == pytest.approx((1 - dice) + cross_entropy, rel=1e-6)


def test_gt_loss_sigmoid_is_dice_plus_bce_on_the_regions_by_hand():
    regions_rows = [[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    logits_rows = [[1.0, -1.0], [2.0, 0.5], [-3.0, 1.0]]
    p = [[_sigmoid(x) for x in row] for row in logits_rows]
    dice = sum(_dice(p[c], regions_rows[c], soft_label=False) for c in range(3)) / 3
    bce = [-(y * math.log(pp) + (1 - y) * math.log(1 - pp)) for yr, pr in zip(regions_rows, p) for y, pp in zip(yr, pr)]
    logits, regions = _as_tensor(logits_rows), _as_tensor(regions_rows)
    got = GTLoss()(logits, regions).item()
    assert got == pytest.approx((1 - dice) + sum(bce) / len(bce), rel=1e-5)
    # exactly the loss the bundles used before the softmax head
    reference = DiceFocalLoss(sigmoid=True, gamma=0.0, smooth_nr=EPS, smooth_dr=EPS)(logits, regions).item()
    assert got == reference


def test_gt_loss_batch_dice_sums_over_the_batch_by_hand():
    """``batch=True``: one Dice per region over both samples. Sample 1 has no ET and predicts some: per sample,
    its ET Dice is ~0 whatever is predicted (empty reference), so only the BCE pushes its false ET down; the
    batch Dice adds a gradient there."""
    regions = [[[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]  # [b][region][voxel]
    logits = [[[1.0, -1.0], [2.0, 0.5], [2.0, -2.0]], [[0.5, -1.0], [1.0, -2.0], [1.5, 0.0]]]
    p = [[[_sigmoid(x) for x in row] for row in sample] for sample in logits]

    def batch_dice(c):
        inter = sum(p[b][c][v] * regions[b][c][v] for b in range(2) for v in range(2))
        denominator = sum(p[b][c][v] + regions[b][c][v] for b in range(2) for v in range(2))
        return (2 * inter + EPS) / (denominator + EPS)

    dice = sum(batch_dice(c) for c in range(3)) / 3
    bce = [
        -(y * math.log(pp) + (1 - y) * math.log(1 - pp))
        for b in range(2) for c in range(3) for y, pp in zip(regions[b][c], p[b][c])
    ]  # fmt: skip
    logits_t, regions_t = torch.tensor(logits), torch.tensor(regions)
    got = GTLoss(batch=True)(logits_t, regions_t).item()
    assert got == pytest.approx((1 - dice) + sum(bce) / len(bce), rel=1e-5)
    # gradient on sample 1's false ET logits: per sample it is the BCE's alone, (sigmoid(f) - 0) / 12 elements
    bce_only = torch.sigmoid(logits_t[1, 2]) / 12
    grads = {}
    for batch in (False, True):
        leaf = logits_t.clone().requires_grad_()
        GTLoss(batch=batch)(leaf, regions_t).backward()
        grads[batch] = leaf.grad[1, 2]
    assert torch.allclose(grads[False], bce_only, atol=1e-6)
    assert bool((grads[True] > bce_only + 5e-3).all())


def test_gt_loss_names_a_head_and_label_mismatch():
    with pytest.raises(ValueError, match="4 channels.*activation"):
        GTLoss(activation="softmax")(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="3 channels.*activation"):
        GTLoss()(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="region channels"):
        GTLoss()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------------------------------------
# classes, regions and label maps


# [1, 2, 4, 1]: one channel of a 3-D volume (ConvertToMultiChannelBasedOnBratsClasses drops that channel)
BRATS_LABEL_LINE = torch.tensor([0, 1, 2, 4, 4, 1, 2, 0], dtype=torch.float32).view(1, 2, 4, 1)


def test_regions_and_classes_convert_both_ways_for_brats_labels():
    regions = ConvertToMultiChannelBasedOnBratsClasses()(BRATS_LABEL_LINE).float()  # [3, 2, 4, 1] TC, WT, ET
    classes = regions_to_classes(regions)
    mapped = BRATS_LABEL_LINE.clone()
    mapped[BRATS_LABEL_LINE == 4] = 3  # BraTS 0/1/2/4 -> classes 0/1/2/3
    assert torch.equal(classes, mapped.long())
    one_hot = torch.cat([classes == c for c in range(4)]).float()
    torch.testing.assert_close(classes_to_regions(one_hot), regions)
    # on probabilities a region's probability is the sum of its classes'
    probs = torch.softmax(torch.randn(4, 5, generator=torch.Generator().manual_seed(0)), dim=0)
    torch.testing.assert_close(classes_to_regions(probs), torch.stack([probs[1] + probs[3], probs[1:].sum(0), probs[3]]))


def test_softmax_label_map_is_the_most_probable_class_and_its_regions_agree():
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, 6, 5, 3, generator=gen) * 3, dim=0)
    labels = probabilities_to_brats_labels(probs, "softmax")
    assert labels.dtype == torch.uint8 and labels.shape == (1, 6, 5, 3)
    expected = torch.tensor(CLASS_LABELS, dtype=torch.uint8)[probs.argmax(0, keepdim=True)]
    assert torch.equal(labels, expected)
    # validation's regions (probabilities_to_regions) are those of the saved label map
    regions = probabilities_to_regions(probs, "softmax")
    torch.testing.assert_close(regions, ConvertToMultiChannelBasedOnBratsClasses()(labels).float())


def test_sigmoid_label_map_is_the_pre_softmax_chain():
    """AsDiscrete(threshold=0.5) then the nested painting, as evaluate.json / inference.json did before 0.3.0."""
    probs = torch.rand(3, 7, 6, 5, generator=torch.Generator().manual_seed(2))
    probs[0, 0, 0, 0] = 0.5  # the threshold itself counts as foreground
    old = regions_to_brats_labels(AsDiscrete(threshold=0.5)(probs))
    assert torch.equal(probabilities_to_brats_labels(probs, "sigmoid"), old)
    assert torch.equal(probabilities_to_regions(probs, "sigmoid"), AsDiscrete(threshold=0.5)(probs))


def test_both_heads_write_the_same_label_map_for_the_same_segmentation():
    """The label-map transform of evaluate.json and inference.json, fed each head's output for one segmentation."""
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    regions = ConvertToMultiChannelBasedOnBratsClasses()(BRATS_LABEL_LINE).float()
    sigmoid_probs = MetaTensor(0.1 + 0.8 * regions, affine=affine)  # 0.9 inside a region, 0.1 outside
    one_hot = torch.cat([regions_to_classes(regions) == c for c in range(4)]).float()
    softmax_probs = MetaTensor(0.04 + 0.88 * one_hot, affine=affine)
    maps = {
        activation: ProbabilitiesToBratsLabelsd("pred", activation)({"pred": probs})["pred"]
        for activation, probs in (("sigmoid", sigmoid_probs), ("softmax", softmax_probs))
    }
    assert torch.equal(maps["sigmoid"], maps["softmax"])
    assert torch.equal(maps["softmax"].as_tensor(), BRATS_LABEL_LINE.to(torch.uint8))
    torch.testing.assert_close(maps["softmax"].affine, affine.double())  # the writer needs the affine


def test_a_head_of_the_wrong_width_is_named():
    with pytest.raises(ValueError, match="softmax head gives 4 channels"):
        probabilities_to_brats_labels(torch.rand(3, 4, 4), "softmax")
    assert (head_channels("sigmoid"), head_channels("softmax")) == (3, 4)


# ---------------------------------------------------------------------------------------------
# the teacher's record and the student's check


def _small_teacher(activation: str, in_channels: int = 4):
    from brats_kd.networks import EncoderDecoder

    return EncoderDecoder(in_channels=in_channels, out_channels=head_channels(activation), filters=[4, 8, 16, 32, 64])


def test_teacher_record_mismatches_are_named_with_both_values(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint = {"model": {}, "record": CheckpointRecord("sigmoid", MODALITIES).state_dict()}
    check_teacher_record(checkpoint, path, "sigmoid", MODALITIES)  # matching: no error
    with pytest.raises(ValueError) as err:
        check_teacher_record(checkpoint, path, "softmax", MODALITIES)
    assert str(path) in str(err.value) and "'sigmoid'" in str(err.value) and "'softmax'" in str(err.value)
    reordered = ["t1ce", "t1", "t2", "flair"]
    with pytest.raises(ValueError) as err:
        check_teacher_record(checkpoint, path, "sigmoid", reordered)
    assert str(MODALITIES) in str(err.value) and str(reordered) in str(err.value)
    assert "trained with activation" not in str(err.value), "only the modalities differ"


def test_a_checkpoint_without_record_is_checked_by_its_head_width(tmp_path):
    """Teachers trained before the record existed: 3 output channels mean sigmoid, 4 softmax."""
    path = tmp_path / "model.pt"
    legacy = {"model": _small_teacher("sigmoid").state_dict()}
    check_teacher_record(legacy, path, "sigmoid", MODALITIES)
    with pytest.raises(ValueError, match=r"3 output channels.*'sigmoid'.*'softmax'"):
        check_teacher_record(legacy, path, "softmax", MODALITIES)


def test_frozen_teacher_refuses_a_checkpoint_of_the_other_head_when_it_loads(tmp_path):
    network = _small_teacher("softmax")
    path = tmp_path / "model.pt"
    torch.save({"model": network.state_dict(), "record": CheckpointRecord("softmax", MODALITIES).state_dict()}, path)
    FrozenTeacher(network, path, bottleneck=None, activation="softmax", modalities=MODALITIES).load()  # accepted
    with pytest.raises(ValueError, match=r"trained with activation 'softmax'.*configured with activation 'sigmoid'"):
        FrozenTeacher(_small_teacher("sigmoid"), path, bottleneck=None, activation="sigmoid", modalities=MODALITIES).load()
    with pytest.raises(ValueError, match="trained on modalities"):
        FrozenTeacher(network, path, bottleneck=None, activation="softmax", modalities=MODALITIES[::-1]).load()


def test_the_student_config_passes_its_head_and_teacher_modalities_to_the_frozen_teacher():
    parser = bundle_config(BUNDLES / "kd_student", ["train.json", "softmax.json"], **TINY)
    teacher = parser.get_parsed_content("train#frozen_teacher")
    assert (teacher.activation, teacher.modalities) == ("softmax", MODALITIES)
    assert parser.get_parsed_content("loss").kd_loss.activation == "softmax"
    assert parser.get_parsed_content("teacher_preprocessing")["activation"] == "softmax"  # the cache records it


# ---------------------------------------------------------------------------------------------
# zoo checks and export with the softmax overrides


def _softmax_files(bundle: str, config: str) -> dict:
    """The zoo tools' file arguments for the softmax network: configs + softmax.json, metadata + its overrides."""
    configs = BUNDLES / bundle / "configs"
    return dict(
        meta_file=str(configs / "metadata.json"),
        args_file=str(configs / "metadata_softmax.json"),
        config_file=[str(configs / config), str(configs / "softmax.json")],
        bundle_root=str(BUNDLES / bundle),
    )


def _softmax_metadata(bundle: str) -> dict:
    """metadata.json with metadata_softmax.json's ``_meta_#...`` overrides applied, as the zoo tools apply them."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(BUNDLES / bundle / "configs" / "metadata.json"))
    overrides = json.loads((BUNDLES / bundle / "configs" / "metadata_softmax.json").read_text())
    for key, value in overrides.items():
        if key.startswith("_meta_#"):
            parser[key] = value
    return parser["_meta_"]


@pytest.mark.parametrize("bundle", ["teacher", "kd_student"])
def test_verify_net_in_out_with_the_zoo_defaults_for_the_softmax_network(bundle):
    from monai.bundle import verify_net_in_out

    files = _softmax_files(bundle, "inference.json")
    verify_net_in_out(net_id="network_def", **files)  # n = p = any = 1, the configs' own sizes
    # the metadata overrides are what describe the 4 channels: the plain metadata does not fit the softmax network
    files.pop("args_file")
    with pytest.raises(ValueError, match="output channel number `4` doesn't match: `3`"):
        verify_net_in_out(net_id="network_def", **files)


def test_softmax_metadata_describes_the_four_classes():
    for bundle in ("teacher", "kd_student"):
        meta = _softmax_metadata(bundle)
        pred = meta["network_data_format"]["outputs"]["pred"]
        assert pred["num_channels"] == 4
        names = [name.lower() for name in pred["channel_def"].values()]
        assert names[0] == "background" and any("edema" in n for n in names) and any("enhancing" in n for n in names)
        assert len(names) == 4
    student = _softmax_metadata("kd_student")
    # MONAI Label names the values of the label map inference.json writes: still BraTS 0/1/2/4
    assert sorted(int(k) for k in student["network_data_format"]["outputs"]["pred"]["channel_def"]) == [0, 1, 2, 4]
    assert student["teacher_data_format"]["outputs"]["pred"]["num_channels"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["teacher", "kd_student"])
def test_torchscript_and_onnx_export_of_the_softmax_network(bundle, tmp_path):
    from monai.bundle import ckpt_export, onnx_export
    from monai.data import load_net_with_metadata

    from tests.test_export import ONNX_ATOL, ONNX_RTOL, onnx_converter_kwargs

    files = _softmax_files(bundle, "inference.json")
    small = {"filters": [4, 8, 16, 32, 64]}
    parser = bundle_config(bundle, ["inference.json", "softmax.json"], **small)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def").eval()
    in_channels = 4 if bundle == "teacher" else 1
    torch.save({"model": network.state_dict()}, tmp_path / "model.pt")
    shape = [1, in_channels, 32, 32, 32]
    common = dict(
        net_id="network_def", ckpt_file=str(tmp_path / "model.pt"), key_in_ckpt="model", input_shape=shape, **files, **small
    )
    ckpt_export(filepath=str(tmp_path / "model.ts"), use_trace=True, **common)
    onnx_export(filepath=str(tmp_path / "model.onnx"), use_trace=True, converter_kwargs=onnx_converter_kwargs(False), **common)

    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    assert meta["network_data_format"]["outputs"]["pred"] == _softmax_metadata(bundle)["network_data_format"]["outputs"]["pred"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = network(x)
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-5)
    assert expected.shape[1] == 4

    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=ONNX_RTOL, atol=ONNX_ATOL)


# ---------------------------------------------------------------------------------------------
# tools.experiment --activation


def test_experiment_passes_the_activation_to_teacher_baseline_and_student(tmp_path, monkeypatch):
    import tools.experiment as experiment
    import tools.report
    from tools.stages import check_overrides

    captured = []
    monkeypatch.setattr(experiment, "prepare_data", lambda *args, **kwargs: tmp_path / "datalist.json")
    monkeypatch.setattr(experiment, "run_stages", lambda stages, *args, **kwargs: captured.extend(stages))
    monkeypatch.setattr(tools.report, "write_report", lambda root: Path(root) / "report.md")
    experiment.kdnet(out=str(tmp_path / "run"), preset="smoke", activation="softmax", run_folds=0)
    models = {stage.name.split("/")[1] for stage in captured}
    assert {"teacher", "baseline", "student"} <= models
    for stage in captured:
        assert stage.overrides["activation"] == "softmax", stage.name
        check_overrides(stage)  # every stage's configs define `activation`
    options = json.loads((tmp_path / "run" / "experiment.json").read_text())["options"]
    assert options["activation"] == "softmax"
    with pytest.raises(ValueError, match="--activation"):
        experiment.kdnet(out=str(tmp_path / "bad"), preset="smoke", activation="relu")


# ---------------------------------------------------------------------------------------------
# the bundles end to end in softmax mode


SOFTMAX_TRAIN = ["train.json", "softmax.json"]


@pytest.fixture(scope="module")
def softmax_teacher(datalist, tmp_path_factory) -> Path:
    """The teacher trained for 1 epoch with the softmax head (tiny network); its ``models`` folder."""
    work = tmp_path_factory.mktemp("softmax_teacher")
    overrides = dict(TINY, datalist=str(datalist), ckpt_dir=str(work / "models"), output_dir=str(work / "runs"), epochs=1)
    run_bundle("teacher", SOFTMAX_TRAIN, cwd=work, **overrides)
    return work / "models"


@pytest.fixture(scope="module")
def softmax_student(softmax_teacher, datalist, tmp_path_factory) -> tuple[Path, str]:
    """One epoch of the full KD-Net objective in softmax mode; (its ``models`` folder, its log)."""
    work = tmp_path_factory.mktemp("softmax_student")
    overrides = student_overrides(datalist, work, softmax_teacher / "model.pt")
    proc = run_bundle("kd_student", SOFTMAX_TRAIN, cwd=work, **overrides)
    return work / "models", proc.stdout


def _evaluate_and_check(bundle: str, ckpt_dir: Path, datalist: Path, datalist_json: dict, tmp_path: Path) -> None:
    """Evaluate in softmax mode; every Dice of the table is the Dice of the saved BraTS label map."""
    out = tmp_path / "eval"
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_bundle(
        bundle, [*SOFTMAX_TRAIN, "evaluate.json"], cwd=tmp_path,
        **dict(TINY, datalist=str(datalist), ckpt_dir=str(ckpt_dir), output_dir=str(out)),
    )
    dataset_dir = Path(datalist_json["dataset_dir"])
    test_cases = [e for e in datalist_json["training"] if e["fold"] == 0]
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(f"{e['case_id']}.nii.gz" for e in test_cases)
    for region, labels in REGION_LABELS.items():
        table = read_raw_csv(out / f"dice_{region}_raw.csv")
        for entry in test_cases:
            saved = assert_label_map_like(out / "predictions" / f"{entry['case_id']}.nii.gz", dataset_dir / entry["label"])
            ref = np.asanyarray(nib.load(str(dataset_dir / entry["label"])).dataobj)
            assert table[entry["case_id"]]["class0"] == pytest.approx(dice_of_region(saved, ref, labels), abs=1e-5)


def _infer_and_check(bundle: str, ckpt_dir: Path, phantom_dataset: Path, case_id: str, modalities, tmp_path: Path) -> None:
    folder = tmp_path / "cases" / case_id
    folder.mkdir(parents=True)
    for modality in modalities:
        source = phantom_dataset / case_id / f"{case_id}_{modality}.nii.gz"
        (folder / source.name).write_bytes(source.read_bytes())
    out = tmp_path / "predictions"
    run_bundle(
        bundle, ["inference.json", "softmax.json"], cwd=tmp_path,
        **dict(TINY, ckpt_dir=str(ckpt_dir), input_dir=str(folder.parent), output_dir=str(out)),
    )
    assert [p.name for p in out.iterdir()] == [f"{case_id}.nii.gz"]
    assert_label_map_like(out / f"{case_id}.nii.gz", folder / f"{case_id}_{modalities[0]}.nii.gz")


@pytest.mark.slow
def test_softmax_teacher_records_its_head_and_evaluates_and_infers(
    softmax_teacher, datalist, datalist_json, phantom_dataset, tmp_path
):
    checkpoint = torch.load(softmax_teacher / "model.pt", map_location="cpu", weights_only=True)
    assert checkpoint["record"] == {"activation": "softmax", "modalities": MODALITIES}
    assert checkpoint["model"]["head.conv.conv.weight"].shape[0] == 4
    _evaluate_and_check("teacher", softmax_teacher, datalist, datalist_json, tmp_path / "evaluate")
    case_id = datalist_json["unlabeled"][0]["case_id"]
    _infer_and_check("teacher", softmax_teacher, phantom_dataset, case_id, MODALITIES, tmp_path / "infer")


@pytest.mark.slow
def test_softmax_student_trains_evaluates_and_infers(softmax_student, datalist, datalist_json, phantom_dataset, tmp_path):
    ckpt_dir, log = softmax_student
    rows = logged_terms(log)
    assert rows, "no training iterations logged"
    for terms in rows:
        assert terms["loss_kd"] > 0 and terms["loss_kl"] > 0 and terms["loss_gt"] > 0, terms
        assert terms["loss"] == pytest.approx(0.75 * terms["loss_kd"] + 0.25 * terms["loss_gt"] + 10 * terms["loss_kl"], abs=2e-3)
    state = torch.load(ckpt_dir / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert state["head.conv.conv.weight"].shape[:2] == (4, 4) and state["encoder.0.conv1.conv.weight"].shape[1] == 1
    _evaluate_and_check("kd_student", ckpt_dir, datalist, datalist_json, tmp_path / "evaluate")
    case_id = datalist_json["unlabeled"][0]["case_id"]
    _infer_and_check("kd_student", ckpt_dir, phantom_dataset, case_id, ["t1ce"], tmp_path / "infer")


@pytest.mark.slow
def test_a_softmax_student_refuses_the_sigmoid_teacher(trained_teacher, datalist, tmp_path):
    """The session's teacher is a sigmoid one: refused before the first iteration, naming both heads."""
    teacher_ckpt = trained_teacher / "model.pt"
    overrides = student_overrides(datalist, tmp_path, teacher_ckpt, cache_rate=0.0)
    proc = run_bundle("kd_student", SOFTMAX_TRAIN, cwd=tmp_path, check=False, **overrides)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if "Refusing teacher checkpoint" in line]
    assert errors, proc.stdout[-3000:]
    assert all(str(teacher_ckpt) in line and "'sigmoid'" in line and "'softmax'" in line for line in errors)
    assert "Epoch: 1/" not in proc.stdout
