"""Custom code of the ``ensemble`` bundle.

Two of the three ensemble members are plain MONAI networks configured in JSON (``unet`` =
``BasicUNet``, ``resunet`` = ``SegResNet``); only the cascaded U-Net of Lachinov et al. needs
code, in :mod:`scripts.cascade`. Configs refer to it as ``scripts.cascade.CascadedUNet``.
"""

from .cascade import CascadedUNet

__all__ = ["CascadedUNet"]
