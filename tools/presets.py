"""Experiment presets: how big the synthetic data set is and how long each bundle trains.

``smoke`` exists for tests (seconds), ``quick`` is the README's main job (2 CPU cores, well under
20 minutes for teacher, baseline and student over its folds), ``paper`` is KD-Net's setting (64³
from a 128³ central crop, 500 epochs, Adam 1e-4, 3 folds) for a GPU and real data.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    folds: int
    phantom_cases: int
    phantom_unlabeled: int
    phantom_size: int
    # Bundle config values shared by every training of the experiment.
    bundle: dict = field(default_factory=dict)
    # Extra values for the ensemble / omni-student bundles (patch-based, native resolution).
    patch_bundle: dict = field(default_factory=dict)
    # Epochs of the KD-Net teachers when they differ from ``bundle["epochs"]`` (baseline and students keep those).
    teacher_epochs: int | None = None

    @property
    def epochs(self) -> int:
        return int(self.bundle["epochs"])


PRESETS = {
    "smoke": Preset(
        name="smoke",
        folds=2,
        phantom_cases=8,
        phantom_unlabeled=2,
        phantom_size=32,
        bundle={
            "epochs": 1,
            "val_interval": 1,
            "spatial_size": [32, 32, 32],
            "filters": [4, 8, 16, 32, 64],
            "batch_size": 2,
            "num_workers": 0,
            "learning_rate": 1e-3,
        },
        patch_bundle={
            "roi_size": [32, 32, 32],
            "unet_features": [4, 4, 8, 16, 32, 4],
            "resunet_init_filters": 8,
            "init_filters": 8,
            "cascade_features": [4, 8, 16, 32],
        },
    ),
    "quick": Preset(
        name="quick",
        folds=2,
        phantom_cases=60,
        phantom_unlabeled=20,
        phantom_size=64,
        bundle={
            "epochs": 80,
            "val_interval": 1,
            # Every case is cropped to its brain's bounding box (any field of view), then resized;
            # the bundles' crop_size (128³) only caps the box, as in KD-Net's central crop.
            "spatial_size": [32, 32, 32],
            "filters": [8, 16, 32, 64, 128],
            "batch_size": 2,
            "num_workers": 0,
            "learning_rate": 1e-3,
            "lr_patience": 20,
        },
        patch_bundle={
            # the ensemble and omni_student bundles' own default: validation (sliding windows over whole cases) every
            # 5th epoch; every epoch it was 46-59 % of a member's epoch here (docs/performance.md section 10)
            "val_interval": 5,
            "roi_size": [32, 32, 32],
            "unet_features": [8, 8, 16, 32, 64, 8],
            "resunet_init_filters": 8,
            "init_filters": 8,
            "cascade_features": [8, 16, 32, 64],
        },
    ),
    "paper": Preset(
        name="paper",
        folds=3,
        phantom_cases=285,
        phantom_unlabeled=100,
        phantom_size=240,
        bundle={
            "epochs": 500,
            "val_interval": 1,
            "spatial_size": [64, 64, 64],
            "crop_size": [128, 128, 128],
            "filters": [16, 32, 64, 128, 256],
            "batch_size": 2,
            "num_workers": 4,
            "learning_rate": 1e-4,
            "lr_patience": 50,
        },
        patch_bundle={"roi_size": [128, 128, 128]},
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
