"""The residual U-Net member with Myronenko's VAE regulariser, used in training only (Lachinov et al. §2.2).

Lachinov et al. train the ensemble's residual U-Net "coupled with the autoencoder branch" of Myronenko
(BraTS 2018; "We follow this choice for training the ensemble model") and drop the branch for the
student. Myronenko's loss (arXiv:1810.11654, §2.3)::

    L = L_dice + 0.1 · L_L2 + 0.1 · L_KL
    L_L2 = ||I_input − I_pred||²                      the VAE branch reconstructs the input image
    L_KL = 1/N · Σ (μ² + σ² − log σ² − 1)             KL(N(μ, σ²) ‖ N(0, 1)), N = number of image voxels

Here ``L_dice`` is the members' segmentation loss (Dice + BCE, Lachinov et al. §2.1). MONAI's
``SegResNetVAE`` builds the branch (``vae_down``, ``vae_fc1/2/3``, ``vae_fc_up_sample``,
``vae_conv_final``) but its loss differs from Myronenko's, so :class:`SegResNetVAETerms` returns the
two terms separately, computed as above:

- MONAI's default ``vae_estimate_std=False`` fixes σ = 0.3 and penalises only mean(μ²), which is not
  the KL term; here σ is estimated (``vae_estimate_std=True``, MONAI's softplus of ``vae_fc2``).
- MONAI takes 0.5 · mean over batch × latent of the KL summand; here it is summed over the latent and
  divided by N, the number of input voxels (channels × H × W × D, the count the L2 mean uses), and
  averaged over the batch, as Myronenko defines it.
- L_L2 is the mean squared error over all input voxels (MONAI's ``F.mse_loss``; a sum over a BraTS
  volume would be 10⁷ times the Dice term).
- MONAI returns ``reg + mse`` with weight 1 each; :class:`VAERegularisedLoss` weights them 0.1 / 0.1.
- MONAI's VAE decoder reuses the segmentation decoder's up-sampling blocks (``up_samples``,
  ``up_layers``); Myronenko's VAE decoder has its own (VUp2..VUp0, VBlock2..VBlock0, Table 1), so
  this class builds a second set, ``vae_up_samples`` / ``vae_up_layers``, of the same structure.
- Latent size 128 (Myronenko's 256 outputs of VD are 128 means and 128 standard deviations).

In evaluation mode the network returns the segmentation logits only and never runs the branch (whose
dense layers fix the training patch size); :func:`segmentation_state_dict` drops the branch's
weights so that a plain ``SegResNet`` of the same arguments loads them strictly: evaluation,
inference, the ensemble and the export use that network, with no VAE branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import SegResNetVAE
from torch import nn

__all__ = [
    "VAE_MODULES",
    "SegResNetVAETerms",
    "SegmentationWeights",
    "VAERegularisedLoss",
    "kl_divergence_term",
    "segmentation_state_dict",
]

#: top-level submodules of :class:`SegResNetVAETerms` that belong to the VAE branch (training only)
VAE_MODULES = (
    "vae_down", "vae_fc1", "vae_fc2", "vae_fc3", "vae_fc_up_sample", "vae_up_samples", "vae_up_layers", "vae_conv_final"
)


def kl_divergence_term(z_mean: torch.Tensor, z_sigma: torch.Tensor, num_voxels: int) -> torch.Tensor:
    """Myronenko's ``L_KL = 1/N Σ (μ² + σ² − log σ² − 1)`` per sample (sum over the latent), averaged over the batch.

    ``z_mean``, ``z_sigma``: (batch, latent); ``num_voxels``: N, the number of voxels of one input image.
    """
    summand = z_mean**2 + z_sigma**2 - torch.log(1e-8 + z_sigma**2) - 1
    return summand.sum(dim=1).mean() / num_voxels


class SegResNetVAETerms(SegResNetVAE):
    """MONAI ``SegResNetVAE`` returning Myronenko's two VAE terms separately (module docstring).

    Training mode: ``forward(x)`` returns ``(segmentation logits, L_L2, L_KL)``; evaluation mode: the
    logits only (a plain tensor, so sliding-window validation and every inferer work as with ``SegResNet``).

    Args:
        input_image_size: spatial size of the training patches (the branch's dense layers depend on it).
        vae_nz: latent size (Myronenko: 128).
        kwargs: ``SegResNet`` arguments (``init_filters``, ``blocks_down``, ``norm``, ...).
    """

    def __init__(self, input_image_size: Sequence[int], vae_nz: int = 128, **kwargs) -> None:
        if kwargs.pop("vae_estimate_std", True) is not True:
            raise ValueError("SegResNetVAETerms estimates sigma (Myronenko's KL term); vae_estimate_std=False is not supported.")
        super().__init__(input_image_size=input_image_size, vae_estimate_std=True, vae_nz=vae_nz, **kwargs)
        # Myronenko's VAE decoder has its own blocks; MONAI's _get_vae_loss would reuse the segmentation decoder's.
        self.vae_up_layers, self.vae_up_samples = self._make_up_layers()

    def vae_terms(self, net_input: torch.Tensor, encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_L2, L_KL)`` of the VAE branch fed with the encoder output ``encoded``, reconstructing ``net_input``."""
        expected = [int(s) for s in self.input_image_size]
        if list(net_input.shape[2:]) != expected:
            raise ValueError(
                f"the VAE branch was built for training patches of {expected} (input_image_size), got an input of "
                f"{list(net_input.shape[2:])}: set input_image_size to the training patch size (roi_size)."
            )
        x_vae = self.vae_down(encoded).flatten(1)
        z_mean = self.vae_fc1(x_vae)
        z_sigma = F.softplus(self.vae_fc2(x_vae))
        kl = kl_divergence_term(z_mean, z_sigma, net_input[0].numel())
        z = z_mean + z_sigma * torch.randn_like(z_mean)  # reparameterisation: a sample of N(μ, σ²)
        x_vae = self.act_mod(self.vae_fc3(z)).view([-1, self.smallest_filters] + self.fc_insize)
        x_vae = self.vae_fc_up_sample(x_vae)
        for up, layer in zip(self.vae_up_samples, self.vae_up_layers):
            x_vae = layer(up(x_vae))
        reconstruction = self.vae_conv_final(x_vae)
        return F.mse_loss(reconstruction, net_input), kl

    def forward(self, x: torch.Tensor):
        net_input = x
        encoded, down_x = self.encode(x)
        down_x.reverse()
        logits = self.decode(encoded, down_x)
        if not self.training:
            return logits
        l2, kl = self.vae_terms(net_input, encoded)
        return logits, l2, kl


class VAERegularisedLoss(nn.Module):
    """Myronenko's total loss: ``seg_loss(logits, target) + l2_weight · L_L2 + kl_weight · L_KL``.

    ``SupervisedTrainer`` calls ``loss_function(pred, label)`` with ``pred`` the network's training
    output, ``(logits, L_L2, L_KL)`` from :class:`SegResNetVAETerms`. Weights 0.1 / 0.1 (Myronenko §2.3).
    The last terms are kept in :attr:`last_terms` (floats) for logging.
    """

    def __init__(self, seg_loss: nn.Module, l2_weight: float = 0.1, kl_weight: float = 0.1) -> None:
        super().__init__()
        if l2_weight < 0 or kl_weight < 0:
            raise ValueError(f"VAE loss weights must be >= 0, got l2_weight={l2_weight}, kl_weight={kl_weight}.")
        self.seg_loss = seg_loss
        self.l2_weight = float(l2_weight)
        self.kl_weight = float(kl_weight)
        self.last_terms: dict[str, float] = {}

    def forward(self, pred, target: torch.Tensor) -> torch.Tensor:
        if not (isinstance(pred, (tuple, list)) and len(pred) == 3):
            raise ValueError(
                "VAERegularisedLoss expects the training output (logits, L_L2, L_KL) of SegResNetVAETerms, got "
                f"{type(pred).__name__}: train the VAE network (train_net_def), in training mode."
            )
        logits, l2, kl = pred
        seg = self.seg_loss(logits, target)
        self.last_terms = {"loss_seg": float(seg.detach()), "loss_l2": float(l2.detach()), "loss_kl": float(kl.detach())}
        return seg + self.l2_weight * l2 + self.kl_weight * kl


def segmentation_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` of a :class:`SegResNetVAETerms` without the VAE branch's entries (:data:`VAE_MODULES`):
    the state dict of a plain ``SegResNet`` with the same arguments."""
    return {key: value for key, value in state.items() if key.split(".", 1)[0] not in VAE_MODULES}


class SegmentationWeights:
    """What a checkpoint saver stores as the member's ``model``: the network's weights without the VAE
    branch (:func:`segmentation_state_dict`), so ``models/<member>/model.pt`` loads strictly into the
    inference network. ``network`` may be wrapped in (Distributed)DataParallel."""

    def __init__(self, network: nn.Module) -> None:
        self.network = network.module if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else network
        if not isinstance(self.network, SegResNetVAETerms):
            raise ValueError(f"SegmentationWeights is for SegResNetVAETerms, got {type(self.network).__name__}.")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return segmentation_state_dict(self.network.state_dict())

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load the segmentation weights; the VAE branch keeps its own (strict on the shared keys)."""
        unexpected = [key for key in state if key.split(".", 1)[0] in VAE_MODULES]
        if unexpected:
            raise ValueError(f"segmentation weights must not hold VAE-branch entries, got {unexpected[:3]}...")
        missing, extra = self.network.load_state_dict(dict(state), strict=False)
        missing = [key for key in missing if key.split(".", 1)[0] not in VAE_MODULES]
        if missing or extra:
            raise RuntimeError(f"segmentation weights do not match the network: missing {missing}, unexpected {extra}.")
