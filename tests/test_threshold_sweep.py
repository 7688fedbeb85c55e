"""tools.threshold_sweep: Dice per threshold and the mean probabilities inside / outside the reference, counted by hand."""

from __future__ import annotations

import pytest
import torch

from tools import threshold_sweep


class FixedProbabilities(torch.nn.Module):
    """Returns the logits of given probabilities, whatever the input (one case, 4 voxels, 3 region channels)."""

    def __init__(self, probabilities: list[list[float]]) -> None:
        super().__init__()
        self.logits = torch.logit(torch.tensor(probabilities)).view(1, 3, 4, 1, 1)

    def forward(self, x):
        return self.logits


def test_dice_at_each_threshold_and_the_probability_inside_the_reference(monkeypatch, tmp_path):
    # TC reference on voxels 0-1 with probabilities 0.45, 0.35 (0.1, 0.1 outside); WT on 0-3; no ET in the case
    probabilities = [[0.45, 0.35, 0.1, 0.1], [0.9, 0.6, 0.45, 0.2], [0.6, 0.1, 0.1, 0.1]]
    label = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32).view(3, 4, 1, 1)
    image = torch.tensor([1.0, -0.5, 2.0, 0.0]).view(1, 4, 1, 1)  # brain = voxels 0-2 (non-zero input)
    dataset = [{"image": image, "label": label}]
    model = (FixedProbabilities(probabilities), ["t1ce"], "sigmoid", dataset)
    monkeypatch.setattr(threshold_sweep, "load_model", lambda folder: model)
    result = threshold_sweep.sweep(tmp_path / "student", [0.5, 0.4, 0.3])
    assert result["model"] == "student"
    inside = result["mean_probability_inside_reference"]
    assert inside["tc"] == pytest.approx(0.4) and inside["wt"] == pytest.approx(0.5375) and inside["et"] is None
    # TC: nothing >= 0.5 (Dice 0), voxel 0 at 0.4 (2*1/(1+2)), voxels 0-1 at 0.3 (1); WT: 2, 3, 3 of the 4 voxels
    assert result["dice"]["0.5"]["tc"] == 0.0
    assert result["dice"]["0.4"]["tc"] == pytest.approx(2 / 3) and result["dice"]["0.3"]["tc"] == pytest.approx(1.0)
    assert [result["dice"][t]["wt"] for t in ("0.5", "0.4", "0.3")] == pytest.approx([2 * 2 / 6, 2 * 3 / 7, 2 * 3 / 7])
    assert result["dice"]["0.5"]["et"] is None, "no case with ET: no ET Dice"
    # outside the reference, in the brain (voxels 0-2): TC voxel 2 (0.1); WT none; ET voxels 0-2 (0.6, 0.1, 0.1)
    outside = result["mean_probability_outside_reference"]
    assert outside["tc"] == pytest.approx(0.1) and outside["wt"] is None and outside["et"] == pytest.approx(0.8 / 3)
    # strictly between 0.1 and 0.9 in the brain: TC 0.45, 0.35 of 3; WT 0.6, 0.45 (0.9 is not) of 3; ET 0.6 of 3
    assert result["undecided_share"] == pytest.approx({"tc": 2 / 3, "wt": 2 / 3, "et": 1 / 3})
    # a teacher's soft targets at T = 2: sigmoid(logit(p) / 2), inside TC = mean over voxels 0-1
    soft = threshold_sweep.sweep(tmp_path / "teacher", [0.5], temperature=2.0)
    expected = sum(1 / (1 + ((1 - p) / p) ** 0.5) for p in (0.45, 0.35)) / 2
    assert soft["temperature"] == 2.0 and soft["mean_probability_inside_reference"]["tc"] == pytest.approx(expected)


def test_bad_thresholds_and_a_softmax_model_are_refused(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        threshold_sweep.main(str(tmp_path), thresholds="0.5,1.5")
    assert exit_info.value.code == 2 and "--thresholds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        threshold_sweep.main(str(tmp_path), thresholds=1.5)  # one number, as `--thresholds 1.5` arrives
    assert exit_info.value.code == 2 and "--thresholds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        threshold_sweep.main(str(tmp_path), temperature=0)
    assert exit_info.value.code == 2 and "--temperature must be a number > 0" in capsys.readouterr().err
    monkeypatch.setattr(threshold_sweep, "load_model", lambda folder: (None, ["t1ce"], "softmax", []))
    with pytest.raises(ValueError, match="softmax head has no per-region probability threshold"):
        threshold_sweep.sweep(tmp_path / "student", [0.5])
