"""brats_kd.config: the logic the bundle configs call in one line (paths, folds, channels, flags)."""

from __future__ import annotations

import pytest
import torch

from brats_kd.config import (
    as_flag,
    by_source,
    channel_selector,
    fold_split,
    folder_cases,
    image_cases,
    modality_selector,
    one_file_per_case,
    resolve_paths,
    test_fold,
)

MSD = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
SEPARATE = {"t1": 0, "t1ce": 0, "t2": 0, "flair": 0}


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), (" TRUE ", True),
                                             ("1", True), ("0", False), ("yes", True), ("off", False)])
def test_command_line_strings_are_read_as_flags(value, expected):
    assert as_flag(value) is expected


def test_an_unknown_flag_word_is_an_error_not_false():
    with pytest.raises(ValueError, match="'flase'"):
        as_flag("flase")


def test_paths_are_joined_for_path_keys_only_with_defaults_and_kept_keys():
    cases = [{"case_id": "a", "t1": "a/t1.nii.gz", "label": "a/seg.nii.gz", "fold": 1, "source": "manual"}]
    assert resolve_paths(cases, "/data", ["t1", "label"]) == [
        {"case_id": "a", "t1": "/data/a/t1.nii.gz", "label": "/data/a/seg.nii.gz", "fold": 1, "source": "manual"}
    ]
    pseudo = [{"case_id": "b", "t1": "b/t1.nii.gz", "label": "/pl/b.nii.gz", "label_format": "probabilities"}]
    out = resolve_paths(pseudo, "/data", ["t1", "label"], defaults={"label_format": "labels", "label_map": 1},
                        keep=["case_id", "label_format", "label_map"])
    assert out == [{"case_id": "b", "t1": "/data/b/t1.nii.gz", "label": "/pl/b.nii.gz", "label_format": "probabilities",
                    "label_map": 1}], "absolute paths stay absolute; the entry's own values win; other keys dropped"


def test_fold_split_every_val_stride_th_of_the_pool_validates_and_the_test_fold_is_held_out():
    cases = [{"case_id": str(i), "fold": i % 3} for i in range(12)]
    split = fold_split(cases, fold=0, val_stride=3)
    pool = [c["case_id"] for c in cases if c["fold"] != 0]
    assert [c["case_id"] for c in split["val"]] == pool[::3]
    assert sorted(c["case_id"] for c in split["train"] + split["val"]) == sorted(pool)
    assert [c["case_id"] for c in test_fold(cases, 0)] == ["0", "3", "6", "9"]
    with pytest.raises(ValueError, match="val_stride"):
        fold_split(cases, 0, 0)


def test_by_source_treats_entries_without_source_as_manual():
    cases = [{"case_id": "a"}, {"case_id": "b", "source": "pseudo"}, {"case_id": "c", "source": "manual"}]
    assert [c["case_id"] for c in by_source(cases, "manual")] == ["a", "c"]
    assert [c["case_id"] for c in by_source(cases, "pseudo")] == ["b"]


def test_msd_channels_are_selected_by_index_and_separate_files_are_kept_whole():
    x = torch.arange(4.0).view(4, 1, 1, 1)
    assert one_file_per_case(MSD) and not one_file_per_case(SEPARATE) and not one_file_per_case({})
    assert channel_selector(MSD, "t1ce")(x).flatten().tolist() == [2.0]
    assert channel_selector(SEPARATE, "t1ce")(x[:1]).flatten().tolist() == [0.0]
    assert modality_selector(MSD, ["t1", "t1ce", "t2", "flair"])(x).flatten().tolist() == [1.0, 2.0, 3.0, 0.0]
    assert modality_selector(MSD, ["flair"])(x).flatten().tolist() == [0.0], "channel 0 is a real index, not 'none'"
    assert modality_selector(SEPARATE, ["t1", "t1ce"])(x) is x


def test_inference_cases_from_a_datalist_and_from_a_folder(tmp_path):
    msd = {"dataset_dir": "/d", "channel_index": MSD, "unlabeled": [{"case_id": "c", **{m: "c.nii.gz" for m in MSD}}]}
    assert image_cases(msd, "unlabeled", ["t1", "t1ce"]) == [{"case_id": "c", "image": ["/d/c.nii.gz"]}]
    brats = {"dataset_dir": "/d", "channel_index": SEPARATE, "unlabeled": [{"case_id": "c", "t1": "c/1", "t1ce": "c/2"}]}
    assert image_cases(brats, "unlabeled", ["t1ce", "t1"]) == [{"case_id": "c", "image": ["/d/c/2", "/d/c/1"]}]
    (tmp_path / "B").mkdir()
    (tmp_path / "A").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert folder_cases(str(tmp_path), ["t1ce"]) == [
        {"case_id": n, "image": [str(tmp_path / n / f"{n}_t1ce.nii.gz")]} for n in ("A", "B")
    ]
    assert folder_cases("", ["t1ce"]) == []
