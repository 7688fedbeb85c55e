"""brats_kd: the code the project's MONAI bundles share (KD-Net, Hu et al., MICCAI 2020; the
ensemble and pseudo-labelling of Lachinov et al.).

Bundle configs name its parts, as zoo bundles name MONAI's (``"_target_": "brats_kd.losses.KDLoss"``).
One module per role:

- :mod:`~brats_kd.io`: the one atomic-write helper; :mod:`~brats_kd.checkpoints`: atomic, resumable
  checkpoints; :mod:`~brats_kd.guards`: stop on a NaN/inf loss or weight.
- :mod:`~brats_kd.config`: datalist paths, fold split, MSD channel selection, boolean flags.
- :mod:`~brats_kd.validation`: the input guard on cases (missing/corrupt files, NaN, geometry, labels).
- :mod:`~brats_kd.labels`, :mod:`~brats_kd.regions`: BraTS label maps and per-entry region conversion;
  :mod:`~brats_kd.metrics`: the BraTS HD95 rule and metric summaries.
- :mod:`~brats_kd.networks`: ``EncoderDecoder``, ``CascadedUNet``, ``StridedUNet``; :mod:`~brats_kd.vae`: the residual
  U-Net's VAE regulariser (training only).
- :mod:`~brats_kd.losses`, :mod:`~brats_kd.bottleneck`, :mod:`~brats_kd.teacher`, :mod:`~brats_kd.trainer`,
  :mod:`~brats_kd.teacher_cache`: the KD-Net objective, frozen teacher and KD trainer.
- :mod:`~brats_kd.ensemble`, :mod:`~brats_kd.pseudo_label`: the averaged ensemble and pseudo-labelling.

Submodules are imported on use (``import brats_kd.losses``), so importing the package is cheap.
"""

__version__ = "0.1.0"

# The submodules bundle configs use in `$` expressions (`$import brats_kd` in their imports); standard library only.
from . import config, cropping  # noqa: E402

__all__ = ["__version__", "config", "cropping"]
