"""The ensemble bundle end to end: the three members' configs and training, ensemble and single-member
evaluation, flip test-time augmentation.

Bundle commands run in subprocesses (:mod:`tests.bundle_runner`); the three member trainings run
side by side. The trained members are shared with ``test_pseudo_label.py`` and
``test_omni_bundle.py`` through :func:`trained_members` (trained once per session).
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.bundle_runner import BUNDLES, BundleRunError, bundle_command, bundle_config, log_tail, run_commands
from tests.conftest import build_once

ENSEMBLE = BUNDLES / "ensemble"
MEMBERS = ("unet", "resunet", "cascade")
PSEUDO = ["inference.json", "pseudo_label.json"]
BRATS_LABELS = {0, 1, 2, 4}

#: Tiny members: 32³ patches / sliding windows (one window per 32×32×21 phantom), few filters.
ENSEMBLE_TINY = {
    "roi_size": [32, 32, 32],
    "unet_features": [4, 4, 8, 8, 16, 4],
    "resunet_init_filters": 8,
    "cascade_features": [4, 8],
    "num_workers": 0,
}

def run_parallel(jobs: dict[str, tuple], check: bool = True) -> dict[str, subprocess.CompletedProcess]:
    """Run several ``monai.bundle run`` commands at once, one torch thread each (2 CPU cores).

    ``jobs``: name → ``(bundle, configs, cwd, overrides)``; each log is ``<cwd>/<name>.log``. Every command runs
    in its own process group and is killed whole after 600 s (``tests.bundle_runner.run_commands``). With
    ``check`` a non-zero exit raises :class:`BundleRunError` with the command and the tail of its log.
    """
    commands = {
        name: (bundle_command(bundle, configs, **overrides), cwd) for name, (bundle, configs, cwd, overrides) in jobs.items()
    }
    results = run_commands(commands, parallel=len(commands), timeout=600)
    if check:
        for name, result in results.items():
            if result.returncode != 0:
                raise BundleRunError(
                    f"{name}: bundle command failed with exit code {result.returncode}:\n  {' '.join(result.args)}\n"
                    f"--- log tail ---\n{log_tail(result.stdout)}"
                )
    return results


def trained_members(tmp_path_factory, datalist) -> Path:
    """``models_dir`` holding ``<member>/model.pt`` and ``checkpoint.pt`` after one epoch of each member on
    fold 0, trained once per test run for every xdist worker (treat as read-only); each member's training log
    is ``<models_dir>/../<member>.log``."""

    def train(work: Path) -> None:
        jobs = {
            member: (
                ENSEMBLE,
                ["train.json", f"member_{member}.json"],
                work,
                dict(ENSEMBLE_TINY, datalist=str(datalist), models_dir=str(work / "models"),
                     output_dir=str(work / "runs" / member), epochs=1, val_interval=1),
            )
            for member in MEMBERS
        }
        run_parallel(jobs)

    key = {"members": MEMBERS, "tiny": ENSEMBLE_TINY, "datalist": str(datalist), "epochs": 1}
    return build_once(tmp_path_factory, "ensemble-members", key, train) / "models"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, datalist) -> Path:
    return trained_members(tmp_path_factory, datalist)


def member_network(member: str, **overrides) -> torch.nn.Module:
    """The member's network as train.json + member_<member>.json build it (tiny sizes)."""
    return bundle_config(ENSEMBLE, ["train.json", f"member_{member}.json"], **ENSEMBLE_TINY, **overrides).get_parsed_content(
        "network_def"
    )


def read_raw_csv(path: Path) -> dict[str, dict[str, float]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return {row["filename"]: {k: float(v) for k, v in row.items() if k != "filename"} for row in rows}


def assert_label_map_like(pred_path: Path, reference_path: Path) -> None:
    pred, ref = nib.load(str(pred_path)), nib.load(str(reference_path))
    assert pred.shape == ref.shape, f"{pred_path.name}: shape {pred.shape} != {ref.shape}"
    np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5, err_msg=f"{pred_path.name}: affine differs")
    assert pred.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(pred.dataobj)).tolist()) <= BRATS_LABELS


# ---------------------------------------------------------------------------------------------
# configs


def test_member_overrides_build_the_papers_three_networks():
    from monai.networks.nets import BasicUNet, SegResNet

    unet, resunet, cascade = (member_network(m) for m in MEMBERS)
    assert isinstance(unet, BasicUNet) and isinstance(resunet, SegResNet)
    assert type(cascade).__name__ == "CascadedUNet"
    # No New-Net: leaky ReLU 0.01, instance norm with affine, trilinear up-sampling after a 1x1 reduction
    leaky = [m for m in unet.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert leaky and all(m.negative_slope == 0.01 for m in leaky)
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.affine for m in norms)
    assert unet.upcat_4.upsample.upsample_non_trainable.mode == "trilinear"
    # Fig. 1: strided convolutions instead of max pooling
    assert not [m for m in unet.modules() if isinstance(m, torch.nn.MaxPool3d)]
    assert [getattr(unet, f"down_{k}").convs.conv_0.conv.stride for k in range(1, 5)] == [(2, 2, 2)] * 4
    # Myronenko's residual U-Net as evaluated and deployed (the VAE branch is the training network's only):
    # 1-2-2-4 blocks down, 1 up, group norm (8)
    from monai.networks.blocks.segresnet_block import ResBlock

    assert [sum(isinstance(m, ResBlock) for m in layer) for layer in resunet.down_layers] == [1, 2, 2, 4]
    assert [sum(isinstance(m, ResBlock) for m in layer) for layer in resunet.up_layers] == [1, 1, 1]
    assert not hasattr(resunet, "vae_down")
    groups = [m for m in resunet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert groups and all(m.num_groups == 8 for m in groups)
    for net in (unet, resunet, cascade):
        with torch.no_grad():
            assert tuple(net.eval()(torch.zeros(1, 4, 32, 32, 32)).shape) == (1, 3, 32, 32, 32)


def test_inference_config_defines_the_same_members_as_train_config():
    train = json.loads((ENSEMBLE / "configs" / "train.json").read_text())
    infer = json.loads((ENSEMBLE / "configs" / "inference.json").read_text())
    for key in ("unet_def", "resunet_def", "cascade_def", "unet_features", "resunet_init_filters", "cascade_features",
                "cascade_coarse_scale", "roi_size"):
        assert infer[key] == train[key], f"{key} differs between train.json and inference.json"


def test_train_and_infer_workflows_have_the_required_properties(datalist):
    from monai.bundle import ConfigWorkflow

    for configs, workflow_type in ((["train.json", "member_cascade.json"], "train"), (["inference.json"], "infer")):
        workflow = ConfigWorkflow(config_file=[str(ENSEMBLE / "configs" / c) for c in configs], workflow_type=workflow_type,
                                  logging_file=False, bundle_root=str(ENSEMBLE), datalist=str(datalist), cache_rate=0.0,
                                  **ENSEMBLE_TINY)
        workflow.initialize()
        assert workflow.check_properties() == [], f"{configs}: missing workflow properties"


@pytest.mark.parametrize(
    "value, expected", [(False, False), ("false", False), ("0", False), (True, True), ("true", True), ("True", True)]
)
def test_command_line_flags_are_read_as_flags_not_by_truthiness(value, expected):
    """``--tta false`` reaches the config as the string 'false' (Fire parses Python literals only)."""
    infer = bundle_config(ENSEMBLE, ["inference.json", "pseudo_label.json"], tta=value, soft_labels=value)
    train = bundle_config(ENSEMBLE, "train.json", resume=value)
    assert len(infer.get_parsed_content("tta_flips")) == (4 if expected else 1)
    assert infer.get_parsed_content("soft_labels_enabled") is expected
    assert train.get_parsed_content("resume_enabled") is expected


def test_training_transforms_follow_the_papers_augmentation(datalist):
    """Patches of roi_size that contain tumour, scale/rotation, flips on the two in-plane axes only,
    per-modality intensity shift/scale/contrast; validation keeps the whole native volume."""
    config = json.loads((ENSEMBLE / "configs" / "train.json").read_text())
    targets = [t["_target_"] for t in config["random_transforms"]]
    for name in ("RandCropByPosNegLabeld", "RandAffined", "RandShiftIntensityd", "RandScaleIntensityd"):
        assert name in targets
    flips = [t["spatial_axis"] for t in config["random_transforms"] if t["_target_"] == "RandFlipd"]
    assert flips == [0, 1], "mirroring only on the in-plane axes (the paper keeps the axial orientation)"
    assert all(t.get("channel_wise") for t in config["random_transforms"] if "Intensity" in t["_target_"])
    parser = bundle_config(
        ENSEMBLE, ["train.json", "member_unet.json"], datalist=str(datalist), **ENSEMBLE_TINY, affine_prob=1.0, intensity_prob=1.0
    )
    contrast = parser.get_parsed_content("contrast_transforms")
    assert [type(t).__name__ for t in contrast] == ["RandAdjustContrastd"] * 4  # one gamma per modality
    case = parser.get_parsed_content("train_datalist")[0]
    sample = parser.get_parsed_content("train#preprocessing")(dict(case))
    val_case = parser.get_parsed_content("validate#preprocessing")(dict(case))
    sample = sample[0] if isinstance(sample, list) else sample
    assert tuple(sample["image"].shape) == (4, 32, 32, 32) and tuple(sample["label"].shape) == (3, 32, 32, 32)
    assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0}
    assert sorted(k for k in sample if k.startswith("image_")) == []  # per-modality split keys merged back
    reference = nib.load(case["t1"]).shape
    assert tuple(val_case["image"].shape[1:]) == reference, "validation must see the native volume"


def _ensemble_inputs(pred_keys: list[str], et_size: int) -> dict:
    """Members' logits (every member and flip alike except one member voting against at one voxel) for
    nested cubes on a 1 mm grid: WT 6³, TC 4³ inside it, ET ``et_size``³ inside TC."""
    from monai.data import MetaTensor

    logits = torch.full((3, 8, 8, 8), -5.0)
    logits[1, 1:7, 1:7, 1:7] = 5.0  # WT
    logits[0, 2:6, 2:6, 2:6] = 5.0  # TC
    lo = 4 - et_size // 2
    logits[2, lo : lo + et_size, lo : lo + et_size, lo : lo + et_size] = 5.0  # ET
    voted = logits.clone()
    voted[1, 0, 0, 0] = 3.0  # WT at the corner: one member in three says no -> mean probability 0.65, still WT
    dissent = logits.clone()
    dissent[1, 0, 0, 0] = -3.0
    data = {}
    for i, key in enumerate(pred_keys):
        data[key] = MetaTensor(dissent if i < len(pred_keys) // 3 else voted, affine=torch.eye(4))
    return data


def test_inference_defaults_are_the_submissions_post_processing():
    """Lachinov et al.'s submission (and the pseudo-labeller): the members' sigmoid outputs averaged over 4 in-plane
    flips, threshold 0.5, nested painting WT -> 2, TC -> 1, ET -> 4, and ET under 32 voxels (1 mm) -> necrosis."""
    for configs in (["inference.json"], ["inference.json", "pseudo_label.json"]):
        parser = bundle_config(ENSEMBLE, configs)
        assert parser.get_parsed_content("tta_enabled") is True
        assert sorted(map(sorted, parser.get_parsed_content("tta_flips"))) == [[], [0], [0, 1], [1]]
        assert parser.get_parsed_content("et_min_voxels") == 32
    necrosis = [t for t in bundle_config(ENSEMBLE, PSEUDO).get_parsed_content("hard_label_writer")
                if type(t).__name__ == "EnhancingToNecrosisd"]
    assert [t.et_min_voxels for t in necrosis] == [32.0], "hard pseudo labels get the same ET rule"

    parser = bundle_config(ENSEMBLE, "inference.json")
    keys = parser.get_parsed_content("ensemble_pred_keys")
    assert len(keys) == 12  # 3 members x 4 flips
    postprocessing = parser.get_parsed_content("postprocessing")
    for et_size, et_label in ((2, 1), (4, 4)):  # 8 ET voxels (< 32) become necrosis; 64 stay enhancing
        labels = postprocessing(_ensemble_inputs(keys, et_size))["pred"][0]
        expected = torch.zeros(8, 8, 8)
        expected[1:7, 1:7, 1:7] = 2
        expected[2:6, 2:6, 2:6] = 1
        lo = 4 - et_size // 2
        expected[lo : lo + et_size, lo : lo + et_size, lo : lo + et_size] = et_label
        expected[0, 0, 0] = 2
        assert torch.equal(labels.as_tensor().float(), expected), f"ET of {et_size ** 3} voxels"


def test_evaluation_keeps_one_et_rule_for_every_model_of_a_table():
    """Evaluation defaults stay comparable: no ET post-processing and no flips for any member, the ensemble or the
    students (the experiment runner sets one value for all), while inference and pseudo-labelling use both."""
    from tests.bundle_runner import BUNDLES

    member = bundle_config(ENSEMBLE, ["train.json", "member_unet.json", "evaluate.json"])
    ensemble = bundle_config(ENSEMBLE, ["train.json", "evaluate.json", "evaluate_ensemble.json"])
    student = bundle_config(BUNDLES / "omni_student", ["train.json", "evaluate.json"])
    assert {p.get_parsed_content("et_min_voxels") for p in (member, ensemble, student)} == {0}
    assert ensemble.get_parsed_content("tta_enabled") is False
    assert len(ensemble.get_parsed_content("ensemble_pred_keys")) == 3  # one output per member


# ---------------------------------------------------------------------------------------------
# training and evaluation


def test_each_member_trains_one_epoch_and_saves_its_own_checkpoint(models_dir):
    for member in MEMBERS:
        assert (models_dir / member / "checkpoint.pt").is_file(), f"{member}: no resumable checkpoint"
        state = torch.load(models_dir / member / "model.pt", map_location="cpu", weights_only=True)
        net = member_network(member)
        net.load_state_dict(state["model"])  # the member's inference architecture, strictly
        if member == "resunet":  # trained with the VAE branch: model.pt holds the branch-free weights, checkpoint.pt all
            assert not [k for k in state["model"] if k.startswith("vae_")]
            resume = torch.load(models_dir / member / "checkpoint.pt", map_location="cpu", weights_only=True)
            assert any(k.startswith("vae_fc1.") for k in resume["model"])
        log = (models_dir.parent / f"{member}.log").read_text()
        assert "Epoch: 1/1" in log and "val_mean_dice" in log


def test_ensemble_and_single_member_evaluation_write_metrics_summary_and_label_maps(
    models_dir, datalist, datalist_json, tmp_path
):
    out = tmp_path / "eval"
    results = run_parallel(
        {
            "ensemble": (
                ENSEMBLE,
                ["train.json", "evaluate.json", "evaluate_ensemble.json"],
                tmp_path,
                dict(ENSEMBLE_TINY, datalist=str(datalist), models_dir=str(models_dir), output_dir=str(out / "ensemble")),
            ),
            "resunet": (
                ENSEMBLE,
                ["train.json", "member_resunet.json", "evaluate.json"],
                tmp_path,
                dict(ENSEMBLE_TINY, datalist=str(datalist), models_dir=str(models_dir), output_dir=str(out / "resunet")),
            ),
        }
    )
    assert all(f"Restored all variables from {models_dir / m / 'model.pt'}" in results["ensemble"].stdout for m in MEMBERS)
    test_cases = {c["case_id"]: c for c in datalist_json["training"] if c["fold"] == 0}
    for name in ("ensemble", "resunet"):
        folder = out / name
        summary = json.loads((folder / "summary.json").read_text())
        for metric in ("dice_tc", "dice_wt", "dice_et", "hd95_tc", "hd95_wt", "hd95_et"):
            assert summary[metric]["n"] == len(test_cases), f"{name}: {metric} not computed for every test case"
            assert set(read_raw_csv(folder / f"{metric}_raw.csv")) == set(test_cases)
        for case_id, case in test_cases.items():
            assert_label_map_like(
                folder / "predictions" / f"{case_id}.nii.gz", Path(datalist_json["dataset_dir"]) / case["label"]
            )


# ---------------------------------------------------------------------------------------------
# flip test-time augmentation


def test_flip_variants_are_the_four_in_plane_mirrorings():
    from brats_kd.ensemble import flip_variants

    assert flip_variants(False) == [[]]
    assert sorted(map(sorted, flip_variants(True))) == [[], [0], [0, 1], [1]]


def test_flipped_member_mirrors_input_and_output():
    from brats_kd.ensemble import Flipped

    class Probe(torch.nn.Module):  # not flip-equivariant: output depends on position
        def forward(self, x):
            ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
            return x[:, :3] * ramp

    x = torch.randn(1, 4, 6, 5, 4)
    net = Probe()
    expected = torch.flip(net(torch.flip(x, [2, 3])), [2, 3])
    torch.testing.assert_close(Flipped(net, [0, 1])(x), expected)
    torch.testing.assert_close(Flipped(net, [])(x), net(x))
    with pytest.raises(ValueError):
        Flipped(net, [0, 0])
