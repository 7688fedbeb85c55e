"""Every bundle's training preprocessing on the BraTS 2023 and MSD layouts (``tools.prepare`` datalists).

The same phantom cases are written in three layouts: BraTS 2021 (one file per modality, labels
1/2/4), BraTS 2023 (other file names, ET = 3) and MSD Task01 (one 4-D image with the channels
FLAIR, T1, T1ce, T2; labels 1 = oedema, 2 = non-enhancing, 3 = enhancing). Through each bundle's
deterministic preprocessing every layout must give exactly the BraTS 2021 tensors: the input
channels in the bundle's modality order (the KD student's ``image`` is T1ce — MSD channel 2 — and its
``teacher_image`` T1, T1ce, T2, FLAIR) and the TC/WT/ET label channels. The BraTS 2021 tensors are
anchored on the phantom's own arrays where the geometry is native (ensemble member, omni-student)
and on each other where it is cropped and resized (baseline, KD student; the teacher's own test is in
``test_teacher_bundle.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.bundle_runner import BUNDLES, TINY, bundle_config

LAYOUTS = ("brats2021", "brats2023", "msd")
SIZE, SEED, CASES = 32, 3, 2
#: bundle → (bundle folder, configs, overrides, output keys compared)
PIPELINES = {
    "teacher": ("teacher", ["train.json"], TINY, ("image", "label")),
    "baseline": ("teacher", ["train.json", "baseline.json"], TINY, ("image", "label")),
    "kd_student": ("kd_student", ["train.json"], TINY, ("image", "teacher_image", "label")),
    "ensemble_member": ("ensemble", ["train.json", "member_unet.json"], {"num_workers": 0}, ("image", "label")),
    "omni_student": ("omni_student", ["train.json"], {"num_workers": 0}, ("image", "label")),
}


@pytest.fixture(scope="module")
def layout_datalists(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """The same 2 phantom cases in each layout: ``{layout: (2-fold tools.prepare datalist, case ids in
    generation order)}`` (each layout names its cases its own way)."""
    from tools.phantom import write_dataset
    from tools.prepare import prepare

    root = tmp_path_factory.mktemp("layouts")
    datalists = {}
    for layout in LAYOUTS:
        ids = write_dataset(root / layout, layout=layout, cases=CASES, unlabeled=0, size=SIZE, seed=SEED)
        prepare(root / layout, root / f"{layout}.json", folds=2, seed=0)
        datalists[layout] = (root / f"{layout}.json", list(ids))
    return datalists


def preprocess(pipeline: str, datalist: tuple[Path, list[str]]) -> dict[int, dict[str, np.ndarray]]:
    """``{phantom case index: {key: array}}``: the bundle's ``preprocessing_transforms`` on every case of
    the datalist (each case is the validation case of the fold it does not belong to)."""
    from monai.transforms import Compose

    bundle, configs, overrides, keys = PIPELINES[pipeline]
    datalist, ids = datalist
    out = {}
    for fold in (0, 1):
        parser = bundle_config(BUNDLES / bundle, configs, **overrides, datalist=str(datalist), fold=fold)
        transform = Compose(parser.get_parsed_content("preprocessing_transforms"))
        for entry in parser.get_parsed_content("val_datalist"):
            data = transform(dict(entry))
            out[ids.index(entry["case_id"])] = {k: np.asarray(torch.as_tensor(data[k])) for k in keys}
    assert len(out) == CASES, f"{pipeline}: expected {CASES} cases, got {sorted(out)}"
    return out


@pytest.fixture(scope="module")
def reference(layout_datalists) -> dict[str, dict]:
    """Each pipeline's output on the BraTS 2021 layout."""
    return {pipeline: preprocess(pipeline, layout_datalists["brats2021"]) for pipeline in PIPELINES}


def phantom_arrays(index: int) -> tuple[np.ndarray, np.ndarray]:
    """(the four modalities t1, t1ce, t2, flair stacked, TC/WT/ET regions) of a phantom case, from the generator."""
    from tools.phantom import MODALITIES, make_case

    case = make_case(index, SIZE, SEED)
    label = case.label
    regions = np.stack([(label == 1) | (label == 4), label > 0, label == 4]).astype(np.float32)
    assert all(np.any(label == v) for v in (1, 2, 4)), f"phantom case {index} must hold every label"
    return np.stack([case.images[m] for m in MODALITIES]).astype(np.float32), regions


@pytest.mark.parametrize("pipeline", ["ensemble_member", "omni_student"])
def test_native_geometry_pipelines_give_the_phantoms_own_channels_and_regions(pipeline, reference):
    """Anchor: at native resolution the BraTS 2021 output is the phantom's z-scored t1, t1ce, t2, flair and
    its TC/WT/ET regions."""
    from monai.transforms import NormalizeIntensity

    for case_id, out in reference[pipeline].items():
        images, regions = phantom_arrays(case_id)
        np.testing.assert_array_equal(out["label"], regions, err_msg=f"{pipeline} {case_id}: TC/WT/ET")
        expected = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(images))
        np.testing.assert_allclose(out["image"], expected, atol=1e-5, err_msg=f"{pipeline} {case_id}: channel order")


def test_resampled_pipelines_agree_on_the_t1ce_channel(reference):
    """Anchor: the baseline's and the KD student's input are the teacher's T1ce (its channel 1), and the KD
    student's ``teacher_image`` is the teacher's input; the labels are the teacher's."""
    for case_id, teacher in reference["teacher"].items():
        baseline, student = reference["baseline"][case_id], reference["kd_student"][case_id]
        assert teacher["image"].shape[0] == 4 and baseline["image"].shape[0] == 1 and student["image"].shape[0] == 1
        np.testing.assert_allclose(baseline["image"][0], teacher["image"][1], atol=1e-5, err_msg=f"baseline {case_id}")
        np.testing.assert_allclose(student["image"][0], teacher["image"][1], atol=1e-5, err_msg=f"student {case_id}")
        np.testing.assert_allclose(student["teacher_image"], teacher["image"], atol=1e-5, err_msg=f"teacher_image {case_id}")
        for other in (baseline, student):
            np.testing.assert_array_equal(other["label"], teacher["label"], err_msg=f"label {case_id}")


@pytest.mark.parametrize("layout", ["brats2023", "msd"])
@pytest.mark.parametrize("pipeline", list(PIPELINES))
def test_every_layout_gives_the_brats2021_tensors(pipeline, layout, layout_datalists, reference):
    out = preprocess(pipeline, layout_datalists[layout])
    assert sorted(out) == sorted(reference[pipeline])
    for case_id, tensors in out.items():
        for key, value in tensors.items():
            expected = reference[pipeline][case_id][key]
            assert value.shape == expected.shape, f"{pipeline} {layout} {case_id} {key}: {value.shape} != {expected.shape}"
            if key == "label":
                np.testing.assert_array_equal(value, expected, err_msg=f"{pipeline} {layout} {case_id}: TC/WT/ET")
            else:
                for channel in range(value.shape[0]):
                    np.testing.assert_allclose(
                        value[channel], expected[channel], atol=1e-5,
                        err_msg=f"{pipeline} {layout} {case_id}: {key} channel {channel} is not the BraTS 2021 one",
                    )  # fmt: skip
