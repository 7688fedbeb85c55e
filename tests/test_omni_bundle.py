"""The omni-student bundle: a residual U-Net trained on manual + pseudo labels (Lachinov et al. §4).

It trains one epoch on the combined datalist written by the ensemble's pseudo-labelling (soft
labels, so both label formats meet in one batch stream), evaluates on manual cases only, and maps
every entry's labels with that entry's own convention.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from brats_kd.config import resolve_paths
from tests.bundle_runner import BUNDLES, bundle_config
from tests.test_ensemble_bundle import assert_label_map_like, run_parallel
from tests.test_pseudo_label import pseudo_labelled

OMNI = BUNDLES / "omni_student"
OMNI_TINY = {"roi_size": [32, 32, 32], "init_filters": 8, "num_workers": 0}

_SESSION: dict[str, object] = {}


def trained_student(tmp_path_factory, datalist, phantom_dataset) -> dict:
    """Train 1 epoch on the soft-label combined datalist, then evaluate and infer side by side."""
    if "work" not in _SESSION:
        pseudo = pseudo_labelled(tmp_path_factory, datalist, phantom_dataset)
        combined = pseudo["work"] / "soft" / "datalist.json"
        work = tmp_path_factory.mktemp("omni")
        common = dict(OMNI_TINY, datalist=str(combined), ckpt_dir=str(work / "models"))
        train = run_parallel(
            {"train": (OMNI, "train.json", work, dict(common, output_dir=str(work / "runs"), epochs=1, val_interval=1))}
        )
        after = run_parallel(
            {
                "evaluate": (OMNI, ["train.json", "evaluate.json"], work, dict(common, output_dir=str(work / "eval"))),
                "infer": (
                    OMNI,
                    "inference.json",
                    work,
                    dict(OMNI_TINY, datalist=str(datalist), ckpt_dir=str(work / "models"), output_dir=str(work / "predictions")),
                ),
            }
        )
        _SESSION.update(
            work=work,
            combined=combined,
            hard_combined=pseudo["work"] / "hard" / "datalist.json",
            train_log=train["train"].stdout,
            eval_log=after["evaluate"].stdout,
        )
    return _SESSION


@pytest.fixture(scope="module")
def student(tmp_path_factory, datalist, phantom_dataset) -> dict:
    return trained_student(tmp_path_factory, datalist, phantom_dataset)


def parsed(configs, **overrides):
    """The omni-student bundle's ``configs`` at tiny sizes, with ``overrides``."""
    return bundle_config(OMNI, configs, **OMNI_TINY, **overrides)


# ---------------------------------------------------------------------------------------------
# configs


def test_workflows_have_the_required_properties(datalist):
    from monai.bundle import ConfigWorkflow

    for config, workflow_type in (("train.json", "train"), ("inference.json", "infer")):
        workflow = ConfigWorkflow(
            config_file=str(OMNI / "configs" / config),
            workflow_type=workflow_type,
            logging_file=False,
            bundle_root=str(OMNI),
            datalist=str(datalist),
            cache_rate=0.0,
            **OMNI_TINY,
        )
        workflow.initialize()
        assert workflow.check_properties() == [], f"{config}: missing workflow properties"


def test_student_is_the_residual_unet_without_vae():
    from monai.networks.nets import SegResNet

    net = parsed("train.json").get_parsed_content("network_def")
    assert isinstance(net, SegResNet) and not hasattr(net, "vae_down")
    with torch.no_grad():
        assert tuple(net.eval()(torch.zeros(1, 4, 16, 16, 16)).shape) == (1, 3, 16, 16, 16)


def test_pseudo_cases_only_train_and_validation_and_test_sets_are_manual(student):
    combined = json.loads(Path(student["hard_combined"]).read_text())
    pseudo_ids = {e["case_id"] for e in combined["training"] if e["source"] == "pseudo"}
    manual = [e for e in combined["training"] if e["source"] == "manual"]
    assert pseudo_ids
    parser = parsed(["train.json", "evaluate.json"], datalist=str(student["hard_combined"]))
    train_ids = [c["case_id"] for c in parser.get_parsed_content("train_datalist")]
    val_ids = [c["case_id"] for c in parser.get_parsed_content("val_datalist")]
    test_ids = [c["case_id"] for c in parser.get_parsed_content("test_datalist")]
    assert pseudo_ids <= set(train_ids)
    assert not pseudo_ids & (set(val_ids) | set(test_ids))
    assert sorted(test_ids) == sorted(e["case_id"] for e in manual if e["fold"] == 0)
    assert not set(test_ids) & set(train_ids) and not set(val_ids) & set(train_ids)


def test_each_entry_is_mapped_with_its_own_label_convention(student):
    """Pseudo labels (BraTS 0/1/2/4, identity map) and soft labels (3 probability channels) next to
    manual labels: every item becomes TC/WT/ET channels."""
    items = {}
    for kind, path in (("hard", student["hard_combined"]), ("soft", student["combined"])):
        parser = parsed("train.json", datalist=str(path))
        settings = [parser.get_parsed_content(k) for k in ("dataset_dir", "path_keys", "entry_defaults", "entry_keys")]
        transform = parser.get_parsed_content("validate#preprocessing")
        for entry in (
            parser.get_parsed_content("datalist_json")["training"][-1:]
            + parser.get_parsed_content("datalist_json")["training"][:1]
        ):
            items[(kind, entry["source"])] = transform(resolve_paths([entry], *settings)[0])
    for key, item in items.items():
        assert tuple(item["label"].shape[:1]) == (3,), key
        assert "label_map" not in item and "label_format" not in item, "per-entry keys are consumed"
    for key in (("hard", "pseudo"), ("hard", "manual"), ("soft", "manual")):
        assert set(torch.unique(items[key]["label"]).tolist()) <= {0.0, 1.0}, key
    soft = items[("soft", "pseudo")]["label"]
    assert soft.dtype == torch.float32 and 0.0 <= soft.min() and soft.max() <= 1.0
    assert len(torch.unique(soft)) > 2, "soft labels keep the probabilities"


def test_entry_label_to_regions_maps_2023_msd_and_pseudo_values():
    from brats_kd.regions import EntryLabelToRegionsd

    transform = EntryLabelToRegionsd("label", default_label_map={"orig": [1, 2, 4], "target": [1, 2, 4]})
    label = torch.tensor([0, 1, 2, 3, 4], dtype=torch.float32).view(1, 5, 1, 1)
    maps = {
        # values 1..4; a value outside "orig" is left as it is (4 stays ET, 3 is no BraTS class)
        "brats2023": ({"orig": [1, 2, 3], "target": [1, 2, 4]}, ["ncr", "ed", "et", "et"]),
        "msd": ({"orig": [1, 2, 3], "target": [2, 1, 4]}, ["ed", "ncr", "et", "et"]),
        "pseudo": ({"orig": [1, 2, 4], "target": [1, 2, 4]}, ["ncr", "ed", None, "et"]),
    }
    # region membership (TC, WT, ET) of each tissue
    regions = {"ncr": [1, 1, 0], "ed": [0, 1, 0], "et": [1, 1, 1], None: [0, 0, 0]}
    for name, (label_map, tissues) in maps.items():
        out = transform({"label": label, "label_map": label_map, "label_format": "labels"})
        assert "label_map" not in out and "label_format" not in out
        got = out["label"][:, :, 0, 0].T.tolist()  # one row per input value 0..4
        assert got[0] == [0, 0, 0], name
        assert got[1:] == [regions[t] for t in tissues], name
    # no per-entry keys: the default (dataset) convention and hard labels
    assert transform({"label": label})["label"][:, 4, 0, 0].tolist() == [1, 1, 1]
    probs = torch.rand(3, 2, 2, 2)
    torch.testing.assert_close(transform({"label": probs, "label_format": "probabilities"})["label"], probs)
    with pytest.raises(ValueError, match="3 channels"):
        transform({"label": label, "label_format": "probabilities"})
    with pytest.raises(ValueError, match="label_format"):
        transform({"label": label, "label_format": "onehot"})


def root_cause(error: BaseException) -> BaseException:
    """The original exception under MONAI's "Failed to evaluate ConfigExpression" wrapper."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def test_missing_datalist_and_mismatched_ensemble_fold_fail_clearly(student, tmp_path):
    with pytest.raises(RuntimeError) as missing:
        parsed("train.json", datalist=str(tmp_path / "missing.json")).get_parsed_content("initialize#0")
    with pytest.raises(RuntimeError) as mismatch:
        parsed("train.json", datalist=str(student["combined"]), fold=1).get_parsed_content("initialize#1")
    assert parsed("train.json", datalist=str(student["combined"])).get_parsed_content("initialize#1")
    assert isinstance(root_cause(missing.value), FileNotFoundError)
    assert "run the ensemble bundle pseudo-labelling first" in str(root_cause(missing.value))
    assert isinstance(root_cause(mismatch.value), ValueError)
    assert "ensemble trained with fold 0, but fold is 1" in str(root_cause(mismatch.value))


# ---------------------------------------------------------------------------------------------
# end to end


def test_trains_one_epoch_on_manual_plus_pseudo_cases(student):
    combined = json.loads(Path(student["combined"]).read_text())
    pseudo = [e for e in combined["training"] if e["source"] == "pseudo"]
    manual_pool = [e for e in combined["training"] if e["source"] == "manual" and e["fold"] != 0]
    n_train = len([e for i, e in enumerate(manual_pool) if i % 5 != 0]) + len(pseudo)
    iterations = -(-n_train // 2)  # batch_size 2
    assert f"Epoch: 1/1, Iter: {iterations}/{iterations}" in student["train_log"]
    models = student["work"] / "models"
    assert (models / "checkpoint.pt").is_file()
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    parsed("train.json").get_parsed_content("network_def").load_state_dict(state["model"])


def test_evaluation_scores_the_manual_test_fold_only(student, datalist_json):
    folder = student["work"] / "eval"
    with (folder / "dice_raw.csv").open(newline="") as f:
        rows = [row["filename"] for row in csv.DictReader(f)]
    expected = sorted(c["case_id"] for c in datalist_json["training"] if c["fold"] == 0)
    assert sorted(rows) == expected
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["dice_wt"]["n"] == len(expected) and summary["hd95_et"]["n"] == len(expected)
    for case_id in expected:
        case = next(c for c in datalist_json["training"] if c["case_id"] == case_id)
        assert_label_map_like(folder / "predictions" / f"{case_id}.nii.gz", Path(datalist_json["dataset_dir"]) / case["label"])


def test_inference_writes_label_maps_for_unlabeled_cases(student, datalist_json):
    for case in datalist_json["unlabeled"]:
        assert_label_map_like(
            student["work"] / "predictions" / f"{case['case_id']}.nii.gz", Path(datalist_json["dataset_dir"]) / case["t1"]
        )
