"""tools.modality_occlusion: blanked channel groups and the ET counts, with a network whose ET output is known."""

from __future__ import annotations

import pytest
import torch

from tools import modality_occlusion

MODALITIES = ["t1", "t1ce", "t2", "flair"]


def test_blank_groups_of_four_modalities_and_of_one():
    groups = modality_occlusion.blank_groups(MODALITIES)
    assert groups == {"none": [], "t1": [0], "t1ce": [1], "t2": [2], "flair": [3], "t2+flair": [2, 3], "t1+t2+flair": [0, 2, 3]}
    assert modality_occlusion.blank_groups(["t1ce"]) == {"none": []}


class EtFromT2(torch.nn.Module):
    """Logits of a sigmoid head: TC and WT off everywhere, ET on wherever the T2 channel (index 2) is positive."""

    def forward(self, x):
        et = torch.where(x[:, 2:3] > 0, 5.0, -5.0)
        return torch.cat([torch.full_like(et, -5.0), torch.full_like(et, -5.0), et], dim=1)


def _item(et_voxels: list[int], t2_voxels: list[int]) -> dict:
    image, label = torch.zeros(4, 2, 2, 2), torch.zeros(3, 2, 2, 2)
    image.view(4, -1)[2, t2_voxels] = 1.0
    label.view(3, -1)[2, et_voxels] = 1.0
    return {"image": image, "label": label}


def test_occlusion_counts_et_dice_and_false_et_per_blanked_group(monkeypatch, tmp_path):
    # case 1 has ET on voxels 0-1 and T2 signal on 0-2 (Dice 2*2/(3+2) = 0.8); case 2 has no ET, T2 on 3 voxels
    dataset = [_item([0, 1], [0, 1, 2]), _item([], [4, 5, 6])]
    monkeypatch.setattr(modality_occlusion, "load_model", lambda folder: (EtFromT2(), MODALITIES, "sigmoid", dataset))
    results = {r.blanked: r for r in modality_occlusion.occlusion(tmp_path / "teacher")}
    assert list(results) == ["none", "t1", "t1ce", "t2", "flair", "t2+flair", "t1+t2+flair"]
    for kept in ("none", "t1", "t1ce", "flair"):  # T2 still there: same ET as without blanking
        r = results[kept]
        assert r.et_dice_on_et_cases == pytest.approx(0.8)
        assert (r.cases_with_et, r.cases_without_et, r.cases_with_false_et, r.false_et_voxels) == (1, 1, 1, 3)
    for blanked in ("t2", "t2+flair", "t1+t2+flair"):  # no T2: no ET anywhere
        r = results[blanked]
        assert r.et_dice_on_et_cases == 0.0 and r.cases_with_false_et == 0 and r.false_et_voxels == 0
    assert results["none"].model == "teacher"


def test_a_folder_without_an_evaluated_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        modality_occlusion.main(str(tmp_path), fold=0, models="teacher")
    assert exit_info.value.code == 2 and "has no evaluated model" in capsys.readouterr().err
