"""``teacher_mode: cached`` of the KD student: flip-equivariant cached Teacher targets, the cache step's
manifest (reruns, stale checkpoints), the loader's checks, the training config's flip wiring, and a
1-epoch cached-mode training through ``monai.bundle run`` after a 1-epoch teacher.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import brats_kd.networks as network_module
import brats_kd.teacher as teacher_module
import brats_kd.teacher_cache as teacher_cache
from tests.bundle_runner import TINY, bundle_config, run_bundle

FILTERS = (4, 8, 16)  # the real network, small: two down-samplings
SIZE = 16  # the bottleneck is 4x4x4, so its flips are not trivial
FP16 = dict(rtol=2e-3, atol=2e-3)  # float16 keeps ~3 significant digits
TERM = re.compile(r"(loss_kd|loss_kl): (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP synchronisation costs on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_teacher(path, seed: int = 0):
    """A FrozenTeacher on a random-weight EncoderDecoder (4 modalities, tiny filters) saved at ``path``."""
    torch.manual_seed(seed)
    network = network_module.EncoderDecoder(4, 3, filters=FILTERS, skip_connections=2)
    torch.save({"model": network.state_dict()}, path)
    return teacher_module.FrozenTeacher(network_module.EncoderDecoder(4, 3, filters=FILTERS, skip_connections=2), path)


def cases(n: int, seed: int = 0) -> list[dict]:
    """In-memory cases whose ``teacher_image`` is already pre-processed (the cache step's transform is identity)."""
    generator = torch.Generator().manual_seed(seed)
    return [{"case_id": f"case{i}", "teacher_image": torch.randn(4, SIZE, SIZE, SIZE, generator=generator)} for i in range(n)]


def identity(data):
    return data


def flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, dims) if dims else x


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache of two cases with its FrozenTeacher (loaded) and the cases."""
    work = tmp_path_factory.mktemp("cache")
    teacher = make_teacher(work / "teacher.pt")
    data = cases(2)
    summary = teacher_cache.TeacherTargetCache(teacher, data, identity, work / "cache").run()
    return work / "cache", teacher, data, summary


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_flipped_cached_targets_equal_the_teachers_tta_on_the_flipped_image(built_cache, axes):
    """Loaded + flipped by RandFlipd (as in training) == flip TTA of the Teacher run on the flipped image."""
    from monai.transforms import Compose, RandFlipd

    cache_dir, teacher, data, _ = built_cache
    keys = ["teacher_image", "teacher_logits", "teacher_bottleneck"]
    pipeline = Compose(
        [teacher_cache.LoadTeacherTargetsd(cache_dir, image_key="teacher_image")]
        + [RandFlipd(keys, prob=1.0, spatial_axis=a) for a in axes]
    )
    out = pipeline(dict(data[0]))
    online_logits, online_bottleneck = teacher_cache.flip_tta(teacher.infer, out["teacher_image"][None].as_tensor())
    torch.testing.assert_close(out["teacher_logits"].as_tensor(), online_logits[0], **FP16)
    torch.testing.assert_close(out["teacher_bottleneck"].as_tensor(), online_bottleneck[0], **FP16)


def test_tta_is_exactly_flip_equivariant_and_a_single_pass_is_not(built_cache):
    _, teacher, data, _ = built_cache
    x = data[1]["teacher_image"][None]
    dims = (2, 4)
    logits, bottleneck = teacher_cache.flip_tta(teacher.infer, x)
    flipped_logits, flipped_bottleneck = teacher_cache.flip_tta(teacher.infer, flip(x, dims))
    torch.testing.assert_close(flipped_logits, flip(logits, dims), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flipped_bottleneck, flip(bottleneck, dims), rtol=1e-5, atol=1e-5)
    # the control: one forward pass of a random-weight network is far from equivariant, so the test above can fail
    single, _ = teacher.infer(x)
    single_flipped, _ = teacher.infer(flip(x, dims))
    assert (single_flipped - flip(single, dims)).abs().max() > 100 * FP16["atol"]


def test_stored_files_are_float16_plain_tensors_with_a_manifest(built_cache):
    cache_dir, teacher, data, summary = built_cache
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["format"] == teacher_cache.CACHE_FORMAT
    assert sorted(manifest["cases"]) == ["case0", "case1"]
    assert summary["cases"] == 2 and summary["computed"] == 2 and summary["skipped"] == 0
    assert summary["teacher_checkpoint_sha256"] == teacher_cache.file_sha256(teacher.checkpoint)
    stored = torch.load(cache_dir / manifest["cases"]["case0"]["file"], weights_only=True)
    assert set(stored) == set(teacher_cache.TARGET_KEYS)
    assert stored["teacher_logits"].dtype == stored["teacher_bottleneck"].dtype == torch.float16
    assert stored["teacher_logits"].shape == (3, SIZE, SIZE, SIZE)
    assert stored["teacher_bottleneck"].shape == (FILTERS[-1], 4, 4, 4)
    assert not list(cache_dir.glob(".*.tmp"))  # atomic writes leave no temporary file


class CountingTeacher:
    """Counts the Teacher forward passes of a FrozenTeacher."""

    def __init__(self, teacher):
        self.calls = 0
        self.infer = teacher.infer

        def counted(image):
            self.calls += 1
            return self.infer(image)

        teacher.infer = counted


def test_rerun_skips_cached_cases_and_recomputes_stale_ones(tmp_path):
    checkpoint = tmp_path / "teacher.pt"
    teacher = make_teacher(checkpoint)
    counter = CountingTeacher(teacher)
    data = cases(3)
    settings = {"spatial_size": [SIZE] * 3}

    def run(**kwargs):
        counter.calls = 0
        options = dict(preprocessing=settings)
        options.update(kwargs)
        return teacher_cache.TeacherTargetCache(teacher, data, identity, tmp_path / "cache", **options).run()

    assert run()["computed"] == 3 and counter.calls == 3 * 8
    assert run()["skipped"] == 3 and counter.calls == 0
    (tmp_path / "cache" / "case1.pt").unlink()
    assert run()["computed"] == 1 and counter.calls == 8
    assert run(preprocessing={"spatial_size": [64] * 3})["computed"] == 3
    torch.manual_seed(1)
    torch.save({"model": network_module.EncoderDecoder(4, 3, filters=FILTERS, skip_connections=2).state_dict()}, checkpoint)
    summary = run(preprocessing={"spatial_size": [64] * 3})
    assert summary["computed"] == 3 and summary["teacher_checkpoint_sha256"] == teacher_cache.file_sha256(checkpoint)


def test_loader_fails_clearly_on_a_missing_incomplete_or_stale_cache(built_cache, tmp_path):
    cache_dir, teacher, _, _ = built_cache
    with pytest.raises(FileNotFoundError, match="cache_teacher.json"):
        teacher_cache.LoadTeacherTargetsd(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="1 of 3 cases"):
        teacher_cache.LoadTeacherTargetsd(cache_dir, expected_cases=["case0", "case1", "case9"])
    other = tmp_path / "other.pt"
    make_teacher(other, seed=1)
    with pytest.raises(ValueError, match="another teacher checkpoint"):
        teacher_cache.LoadTeacherTargetsd(cache_dir, teacher_checkpoint=other)
    with pytest.raises(ValueError, match="other pre-processing settings"):
        teacher_cache.LoadTeacherTargetsd(cache_dir, preprocessing={"spatial_size": [64, 64, 64]})
    loader = teacher_cache.LoadTeacherTargetsd(cache_dir, teacher_checkpoint=teacher.checkpoint, expected_cases=["case0"])
    with pytest.raises(ValueError, match="spatial shape"):
        loader({"case_id": "case0", "image": torch.zeros(1, 2 * SIZE, 2 * SIZE, 2 * SIZE)})


def test_cache_dir_inside_the_data_folder_is_refused(tmp_path):
    teacher = make_teacher(tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="inside the data folder"):
        teacher_cache.TeacherTargetCache(teacher, cases(1), identity, tmp_path / "data" / "cache", dataset_dir=tmp_path / "data")


def test_training_config_flips_targets_with_the_image_in_one_decision():
    """train.json's random flips in cached mode: every key of a RandFlipd gets the same random decision."""
    from monai.transforms import Compose

    parser = bundle_config("kd_student", "train.json", teacher_mode="cached")
    assert parser.get_parsed_content("flip_keys") == ["image", "label", "teacher_logits", "teacher_bottleneck"]
    flips = Compose(parser.get_parsed_content("random_transforms"))
    generator = torch.Generator().manual_seed(0)
    sample = {
        "image": torch.randn(1, 8, 8, 8, generator=generator),
        "label": torch.randn(3, 8, 8, 8, generator=generator),
        "teacher_logits": torch.randn(3, 8, 8, 8, generator=generator),
        "teacher_bottleneck": torch.randn(5, 4, 2, 2, generator=generator),
    }
    candidates = teacher_cache.spatial_flips(3)
    seen = set()
    for seed in range(12):
        flips.set_random_state(seed)
        out = flips(dict(sample))
        image = out["image"].as_tensor()
        applied = [d for d in candidates if torch.equal(image[None], flip(sample["image"][None], d))]
        assert len(applied) == 1
        seen.add(applied[0])
        for key in ("label", "teacher_logits", "teacher_bottleneck"):
            assert torch.equal(out[key].as_tensor()[None], flip(sample[key][None], applied[0])), (seed, key)
    assert len(seen) > 2  # the flips were really random


@pytest.mark.slow
def test_cached_mode_trains_one_epoch_via_bundle_run(tmp_path, monkeypatch):
    """1-epoch teacher -> cache step -> 1-epoch student with ``--teacher_mode cached`` and no teacher checkpoint."""
    from tools.phantom import write_dataset
    from tools.prepare import prepare

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: one thread is faster on a shared 2-core machine
    write_dataset(tmp_path / "data", layout="brats2021", cases=4, size=32, seed=0)
    prepare(tmp_path / "data", tmp_path / "datalist.json", folds=2, seed=0)
    common = dict(TINY, datalist=str(tmp_path / "datalist.json"), epochs=1)
    teacher_dirs = {"ckpt_dir": str(tmp_path / "teacher"), "output_dir": str(tmp_path / "t_runs")}
    run_bundle("teacher", "train.json", cwd=tmp_path, **teacher_dirs, **common)
    teacher_ckpt = tmp_path / "teacher" / "model.pt"
    cache_dir = tmp_path / "cache"
    student = dict(common, teacher_cache_dir=str(cache_dir), output_dir=str(tmp_path / "s_runs"))
    run_bundle("kd_student", ["train.json", "cache_teacher.json"], cwd=tmp_path, teacher_ckpt=str(teacher_ckpt), **student)
    summary = json.loads((cache_dir / "summary.json").read_text())
    train_cases = json.loads(json.dumps(bundle_config("kd_student", "train.json", **common).get_parsed_content("train_datalist")))
    assert summary["cases"] == summary["computed"] == len(train_cases) > 0
    # no teacher in cached mode: a missing checkpoint would stop FrozenTeacher
    proc = run_bundle(
        "kd_student",
        "train.json",
        cwd=tmp_path,
        teacher_mode="cached",
        teacher_ckpt=str(tmp_path / "absent.pt"),
        ckpt_dir=str(tmp_path / "student"),
        **student,
    )
    terms = dict(TERM.findall(proc.stdout))
    assert set(terms) == {"loss_kd", "loss_kl"}, proc.stdout[-2000:]
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in terms.values())
    assert (tmp_path / "student" / "model.pt").is_file()


def test_experiment_runner_caches_each_teacher_before_its_students(tmp_path):
    from tools.experiment import KDNET_MODELS, teacher_cache_stage
    from tools.presets import get_preset

    student = next(m for m in KDNET_MODELS if m.teacher is not None)
    cache_dir = tmp_path / "fold0" / student.teacher / "teacher_cache"
    extra = {"teacher_mode": "cached", "teacher_cache_dir": str(cache_dir)}
    stage = teacher_cache_stage(student, tmp_path, 0, tmp_path / "datalist.json", get_preset("smoke"), 0, extra)
    assert stage.kind == "infer" and stage.done_file == cache_dir / "summary.json"
    assert stage.configs[-1] == "configs/cache_teacher.json" and stage.bundle == "kd_student"
    assert stage.overrides["teacher_ckpt"] == str(tmp_path / "fold0" / student.teacher / "models" / "model.pt")
    assert stage.overrides["teacher_cache_dir"] == str(cache_dir) and stage.overrides["fold"] == 0
    assert not stage.is_done()
