"""Custom code of the ``ensemble`` bundle (configs refer to it as ``scripts.<module>.<name>``).

Two of the three ensemble members are plain MONAI networks configured in JSON (``unet`` =
``BasicUNet``, ``resunet`` = ``SegResNet``); only the cascaded U-Net of Lachinov et al. needs
code, in :mod:`scripts.cascade`. Beyond the networks:

* :mod:`scripts.ensemble` — flip test-time augmentation as network wrappers for ``EnsembleEvaluator``;
* :mod:`scripts.pseudo_label` — output-folder guard, skip-finished filter, confidence sidecars,
  soft-label writer and the combined (manual + pseudo) datalist;
* :mod:`scripts.brats`, :mod:`scripts.reliability` — byte-identical copies of the teacher's BraTS
  conventions and atomic, resumable checkpoints.
"""

from . import brats, ensemble, pseudo_label, reliability
from .cascade import CascadedUNet

__all__ = ["CascadedUNet", "brats", "ensemble", "pseudo_label", "reliability"]
