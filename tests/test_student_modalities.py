"""A KD student on any subset of its teacher's modalities (issue 15 item 1): the config value
``student_modalities`` sets the student's input channels in training, evaluation, inference and the
exported model's metadata; a subset that is empty, repeated or unknown to the teacher is refused.

The end-to-end test trains two tiny students (["flair"], ["t1", "t2"]) for 1 epoch from the session's
shared teacher, evaluates both, runs inference on a folder holding only the student's files and exports
each with the metadata ``python -m brats_kd.modalities`` writes (inference runs for the two-modality student only).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from brats_kd.modalities import metadata_overrides, student_modalities, write_metadata_overrides
from tests.bundle_runner import BUNDLES, TINY, bundle_config, run_bundle
from tests.test_kd_bundle import student_overrides

STUDENT = BUNDLES / "kd_student"
TEACHER_MODALITIES = ["t1", "t1ce", "t2", "flair"]


# ---------------------------------------------------------------------------------------------
# the check


def test_a_subset_of_the_teacher_is_accepted_in_its_own_order():
    assert student_modalities(["t2", "t1"], TEACHER_MODALITIES) == ["t2", "t1"]
    assert student_modalities(("flair",), TEACHER_MODALITIES) == ["flair"]


@pytest.mark.parametrize(
    "student, teacher, problem",
    [
        ([], TEACHER_MODALITIES, "is empty"),
        (["t1", "t1"], TEACHER_MODALITIES, "more than once"),
        (["t1ce", "dwi"], TEACHER_MODALITIES, "['dwi'] not among the teacher's modalities"),
        (["t1ce"], ["t1", "t2", "flair"], "['t1ce'] not among the teacher's modalities"),
        ("t1ce", TEACHER_MODALITIES, "must be a list"),
    ],
)
def test_a_bad_subset_is_refused_naming_both_lists(student, teacher, problem):
    with pytest.raises(ValueError) as err:
        student_modalities(student, teacher)
    message = str(err.value)
    assert problem in message
    if not isinstance(student, str):
        assert f"student_modalities {student!r}" in message and f"teacher_modalities {teacher!r}" in message


@pytest.mark.parametrize("config", ["train.json", "inference.json"])
@pytest.mark.parametrize("modalities", [["flair"], ["t1", "t2"], ["flair", "t1ce", "t2"]])
def test_the_student_network_takes_one_channel_per_student_modality(config, modalities):
    parser = bundle_config(STUDENT, config, student_modalities=modalities, **TINY)
    assert parser.get_parsed_content("modalities") == modalities
    assert parser.get_parsed_content("network_def").encoder[0].conv1.conv.in_channels == len(modalities)


def test_the_training_transforms_stack_the_student_modalities_and_the_cache_records_them(datalist):
    parser = bundle_config(STUDENT, "train.json", datalist=str(datalist), student_modalities=["t2", "t1"], **TINY)
    concat = [t for t in parser.get_parsed_content("read_transforms") if type(t).__name__ == "ConcatItemsd"]
    assert list(concat[0].keys) == ["t2", "t1"], "the image is the student's modalities, in its order"
    assert parser.get_parsed_content("load_modalities") == TEACHER_MODALITIES, "the teacher's input is loaded too"
    assert parser.get_parsed_content("teacher_preprocessing")["student_modalities"] == ["t2", "t1"]


def test_a_student_modality_the_teacher_lacks_is_refused_by_the_config():
    parser = bundle_config(STUDENT, "train.json", student_modalities=["t1ce"], teacher_modalities=["t1", "t2", "flair"])
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("network_def")
    chain, cause = [], err.value
    while cause is not None:  # MONAI wraps the error of a `$` expression
        chain.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(chain)
    assert "student_modalities ['t1ce']" in text and "teacher_modalities ['t1', 't2', 'flair']" in text


def test_metadata_overrides_describe_the_subset(tmp_path):
    meta = metadata_overrides(["t1", "t2"])
    assert meta["_meta_#network_data_format#inputs#image#num_channels"] == 2
    assert meta["_meta_#network_data_format#inputs#image#channel_def"] == {"0": "T1", "1": "T2"}
    softmax = STUDENT / "configs" / "metadata_softmax.json"
    written = write_metadata_overrides(["flair"], tmp_path / "args.json", base=[softmax])
    assert json.loads((tmp_path / "args.json").read_text()) == written
    assert written["_meta_#network_data_format#outputs#pred#num_channels"] == 4, "the base file's entries are kept"
    assert written["_meta_#network_data_format#inputs#image#num_channels"] == 1
    with pytest.raises(ValueError, match="non-empty list"):
        metadata_overrides(["dwi"])


# ---------------------------------------------------------------------------------------------
# end to end: train, evaluate, infer, export


def _export_and_check(modalities: list[str], ckpt: Path, tmp_path: Path) -> None:
    """ckpt_export with the subset's metadata: the saved metadata and the traced network take len(modalities) channels."""
    from monai.bundle import ckpt_export, verify_net_in_out
    from monai.data import load_net_with_metadata

    configs = STUDENT / "configs"
    args = tmp_path / "metadata_args.json"
    write_metadata_overrides(modalities, args)
    common = dict(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        args_file=str(args),
        bundle_root=str(STUDENT),
        filters=TINY["filters"],
        student_modalities=modalities,
    )
    verify_net_in_out(**common)  # the metadata's channel counts fit the network the config builds
    shape = [1, len(modalities), 32, 32, 32]
    ckpt_export(
        filepath=str(tmp_path / "model.ts"), ckpt_file=str(ckpt), key_in_ckpt="model", input_shape=shape, use_trace=True, **common
    )
    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == len(modalities)
    assert list(image["channel_def"].values()) == [{"t1": "T1", "t2": "T2", "flair": "FLAIR"}[m] for m in modalities]
    assert tuple(scripted(torch.randn(*shape)).shape) == (1, 3, 32, 32, 32)


@pytest.mark.slow
@pytest.mark.parametrize("modalities", [["flair"], ["t1", "t2"]], ids=["flair", "t1-t2"])
def test_a_student_on_a_subset_trains_evaluates_infers_and_exports(
    modalities, trained_teacher, datalist, datalist_json, phantom_dataset, tmp_path
):
    overrides = student_overrides(datalist, tmp_path, trained_teacher / "model.pt", student_modalities=modalities)
    run_bundle("kd_student", "train.json", cwd=tmp_path, **overrides)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["model"]
    assert state["encoder.0.conv1.conv.weight"].shape[1] == len(modalities)

    common = dict(TINY, ckpt_dir=str(tmp_path / "models"), student_modalities=modalities)
    out = tmp_path / "eval"
    run_bundle("kd_student", ["train.json", "evaluate.json"], cwd=tmp_path, datalist=str(datalist), output_dir=str(out), **common)
    test_cases = sorted(c["case_id"] for c in datalist_json["training"] if c["fold"] == 0)
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{c}.nii.gz" for c in test_cases]
    assert {"dice_tc", "dice_wt", "dice_et"} <= set(json.loads((out / "summary.json").read_text()))

    if modalities == ["flair"]:  # one inference run is enough to check the folder reading: keep the test short
        _export_and_check(modalities, tmp_path / "models" / "model.pt", tmp_path)
        return
    # inference from a folder holding only the student's modalities of one case
    case_id = datalist_json["unlabeled"][0]["case_id"]
    folder = tmp_path / "cases" / case_id
    folder.mkdir(parents=True)
    for modality in modalities:
        source = phantom_dataset / case_id / f"{case_id}_{modality}.nii.gz"
        (folder / source.name).write_bytes(source.read_bytes())
    predictions = tmp_path / "predictions"
    run_bundle("kd_student", "inference.json", cwd=tmp_path, input_dir=str(folder.parent), output_dir=str(predictions), **common)
    assert [p.name for p in predictions.iterdir()] == [f"{case_id}.nii.gz"]

    _export_and_check(modalities, tmp_path / "models" / "model.pt", tmp_path)
