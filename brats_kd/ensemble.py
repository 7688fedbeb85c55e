"""Flip test-time augmentation for MONAI's ``EnsembleEvaluator``.

The ensemble is evaluated with MONAI's own pieces: ``EnsembleEvaluator`` runs every network of a
list through the same (sliding-window) inferer and stores each output under its own key, and
``MeanEnsembled`` averages the members' sigmoid outputs. MONAI has no exhaustive flip
test-time augmentation (``TestTimeAugmentation`` samples *random* transforms), so flips enter the
same mechanism as extra "networks": :class:`Flipped` wraps a member so that it sees the mirrored
input and returns its output mirrored back. With every member wrapped once per flip, the mean of
all the sigmoid outputs is the mean over members of each member's flip-averaged output (every
member gets the same number of flips, hence the same weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["Flipped", "MeanEnsemble", "flip_variants", "flipped_members"]


class Flipped(nn.Module):
    """``network`` applied to the input mirrored along ``spatial_axes``, its output mirrored back.

    ``spatial_axes`` count spatial dimensions only (0 = first axis after the channel), as in
    MONAI's ``Flip``; an empty sequence makes the wrapper the identity around ``network``. The
    wrapped network is shared, not copied: loading a checkpoint into it updates every wrapper.
    Used inside a sliding-window inferer, each window is mirrored, which is the same flip of the
    image content as mirroring the whole volume.
    """

    def __init__(self, network: nn.Module, spatial_axes: Sequence[int] = ()) -> None:
        super().__init__()
        self.network = network
        self.spatial_axes = tuple(int(a) for a in spatial_axes)
        if any(a < 0 for a in self.spatial_axes) or len(set(self.spatial_axes)) != len(self.spatial_axes):
            raise ValueError(f"spatial_axes must be distinct non-negative axes, got {list(spatial_axes)}.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spatial_axes:
            return self.network(x)
        if max(self.spatial_axes) >= x.dim() - 2:
            raise ValueError(f"cannot flip spatial axes {list(self.spatial_axes)} of an input of shape {list(x.shape)}.")
        dims = [a + 2 for a in self.spatial_axes]  # skip batch and channel
        return torch.flip(self.network(torch.flip(x, dims)), dims)


def flip_variants(tta: bool, spatial_axes: Sequence[int] = (0, 1)) -> list[list[int]]:
    """The flips of the test-time augmentation: ``[[]]`` without TTA; with TTA every subset of
    ``spatial_axes`` (default the two in-plane axes: none, x, y, x+y, the paper's 4 mirrorings)."""
    variants: list[list[int]] = [[]]
    if tta:
        for axis in spatial_axes:
            variants += [v + [int(axis)] for v in variants]
    return variants


def flipped_members(members: Mapping[str, nn.Module], names: Sequence[str], flips: Sequence[Sequence[int]]) -> list[nn.Module]:
    """The network list of the ensemble evaluator: member ``names[0]`` under every flip, then
    ``names[1]``... (the order of the config's ``ensemble_pred_keys``)."""
    unknown = [name for name in names if name not in members]
    if unknown:
        raise ValueError(f"unknown ensemble member(s) {unknown}; known: {sorted(members)}.")
    return [Flipped(members[name], axes) for name in names for axes in flips]


class MeanEnsemble(nn.Module):
    """The ensemble as one network: the mean of its members' **sigmoid probabilities** (TC, WT, ET).

    This is what the model zoo's tools (``verify_net_in_out``, ``ckpt_export``, MONAI Label) call as
    ``network_def``. Members are reachable by name (``ensemble["unet"]``) so that each loads its own
    checkpoint; evaluation and inference may still run them through ``EnsembleEvaluator`` +
    ``MeanEnsembled`` (with :func:`flipped_members` for TTA), which computes the same mean.
    The output is a probability in [0, 1], not a logit: threshold it at 0.5 without a sigmoid.
    """

    def __init__(self, members: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member.")
        self.members = nn.ModuleDict(dict(members))

    def __getitem__(self, name: str) -> nn.Module:
        return self.members[name]

    def __contains__(self, name: str) -> bool:
        return name in self.members

    def __iter__(self):
        return iter(self.members)

    def keys(self):
        return self.members.keys()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probabilities = [torch.sigmoid(member(x)) for member in self.members.values()]
        return torch.stack(probabilities).mean(0)
