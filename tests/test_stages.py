"""The experiment runner refuses an override that no config of the stage defines, before launching
anything (``monai.bundle run`` would ignore it silently), and every override it passes itself exists."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tools.experiment import KDNET_ABLATION_MODELS, KDNET_MODELS, model_stages, omni_stages, teacher_cache_stage
from tools.presets import PRESETS
from tools.stages import Stage, UnknownOverride, check_overrides, run_stage


def stage(tmp_path: Path, **overrides) -> Stage:
    return Stage(name="fold0/teacher/train", bundle="teacher", configs=["configs/train.json", "configs/baseline.json"],
                 overrides=overrides, folder=tmp_path / "stage", kind="train", epochs=1)


def test_an_unknown_override_stops_the_stage_before_it_launches(tmp_path, monkeypatch):
    launched, popen = [], subprocess.Popen

    def record(command, *args, **kwargs):
        if "monai.bundle" in command:
            launched.append(command)
        return popen(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", record)
    with pytest.raises(UnknownOverride) as err:
        run_stage(stage(tmp_path, epochs=1, activaton="softmax"))  # misspelt: monai.bundle run would ignore it
    message = str(err.value)
    assert "'activaton'" in message and "'epochs'" not in message, "names the unknown key only"
    assert "bundle 'teacher'" in message and "configs/train.json, configs/baseline.json" in message
    assert not launched and not (tmp_path / "stage").exists(), "nothing may run or be written"


def test_nested_ids_and_keys_of_any_config_of_the_stage_are_accepted(tmp_path):
    check_overrides(stage(tmp_path, epochs=2, **{"train#trainer#max_epochs": 2, "modalities": ["t1ce"]}))
    with pytest.raises(UnknownOverride, match="'train#trainer#max_epoch'"):
        check_overrides(stage(tmp_path, **{"train#trainer#max_epoch": 2}))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_override_the_runner_passes_is_defined(preset, tmp_path):
    chosen, datalist = PRESETS[preset], tmp_path / "datalist.json"
    stages = []
    for model in KDNET_MODELS + KDNET_ABLATION_MODELS:
        extra = {"teacher_mode": "cached"} if model.bundle == "kd_student" else {}
        if model.teacher is not None:
            extra["teacher_cache_dir"] = str(tmp_path / "cache")
            stages.append(teacher_cache_stage(model, tmp_path, 0, datalist, chosen, 0, extra))
        stages += model_stages(model, tmp_path, 0, datalist, chosen, 0, extra)
    stages += omni_stages(tmp_path, 0, datalist, chosen, 0)
    assert len({s.bundle for s in stages}) == 4
    for s in stages:
        check_overrides(s)


@pytest.mark.parametrize("dice_squared", [True, False])
def test_the_omni_dice_form_reaches_every_network_it_trains(dice_squared, tmp_path):
    stages = omni_stages(tmp_path, 0, tmp_path / "datalist.json", PRESETS["quick"], 0, dice_squared)
    trainings = [s for s in stages if s.kind == "train"]
    assert {s.name.split("/")[1] for s in trainings} == {"member_unet", "member_resunet", "member_cascade", "omni_student",
                                                          "manual_student"}
    assert all(s.overrides["dice_squared"] is dice_squared for s in trainings)
    for s in stages:
        check_overrides(s)  # every stage that receives it defines it


def test_a_bad_dice_form_is_refused_before_anything_is_written(tmp_path):
    from tools.experiment import omni

    with pytest.raises(ValueError, match="--dice_squared: expected a boolean flag"):
        omni(out=str(tmp_path / "omni"), preset="smoke", dice_squared="squared")
    assert not (tmp_path / "omni").exists()
