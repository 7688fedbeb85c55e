"""Capture an encoder--decoder's bottleneck (latent) activation by submodule name.

KD-Net's latent-space term (Eq. 3) compares the Student's bottleneck ``E_s(x_k)`` with the
Teacher's ``E_t(x)``. Rather than requiring a network that returns its latent code, a forward
hook is placed on the submodule that produces it, so any encoder--decoder works unchanged as
long as that submodule can be named (e.g. ``"bottleneck"`` for MONAI's ``DynUNet``, a dotted
path such as ``"model.1.submodule.1"`` for others).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BottleneckHook", "resolve_submodule", "unwrap_module"]


def unwrap_module(network: nn.Module) -> nn.Module:
    """Return the model inside ``DistributedDataParallel``/``DataParallel``-style wrappers.

    Any wrapper that keeps the real network in an ``nn.Module`` attribute called ``module`` is
    peeled off, repeatedly, so that parameter and submodule names match an unwrapped checkpoint.
    """
    while isinstance(getattr(network, "module", None), nn.Module):
        network = network.module
    return network


def resolve_submodule(network: nn.Module, name: str) -> nn.Module:
    """Find the submodule called ``name`` (dotted paths allowed) in ``network`` or in the model it wraps.

    The name is tried on the network as given first (so ``"module.bottleneck"`` works on a DDP
    wrapper) and then on each model unwrapped from a ``.module`` wrapper.

    Raises:
        TypeError: ``network`` is not an ``nn.Module`` or ``name`` is not a non-empty string.
        AttributeError: no such submodule; the message lists the available top-level names.
    """
    if not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
    if not isinstance(name, str) or not name:
        raise TypeError(f"the bottleneck submodule name must be a non-empty string, got {name!r}.")
    candidate = network
    while True:
        try:
            return candidate.get_submodule(name)
        except AttributeError:
            inner = getattr(candidate, "module", None)
            if not isinstance(inner, nn.Module):
                break
            candidate = inner
    available = [child_name for child_name, _ in candidate.named_children()]
    raise AttributeError(
        f"{type(candidate).__name__} has no submodule named {name!r} to use as the bottleneck; "
        f"its top-level submodules are {available}. Set the bottleneck name in the config to the "
        "submodule that outputs the latent code (a dotted path such as 'encoder.4' is allowed)."
    )


class BottleneckHook:
    """Keep the output of a network's bottleneck submodule from its most recent forward pass.

    Args:
        network: the encoder--decoder, possibly wrapped by ``DistributedDataParallel`` or any
            other wrapper exposing the real model as ``.module``.
        module_name: name of the submodule whose output is the latent code; dotted paths allowed.

    The captured tensor is the live activation (not detached), so a loss on it back-propagates
    into the encoder. If the submodule runs several times in one forward pass (e.g. a sliding
    window inferer), only the last call is kept: train with one forward per step.

    Example::

        hook = BottleneckHook(net, "bottleneck")
        logits = net(x)
        latent = hook.output  # what net.bottleneck returned during net(x)
        hook.remove()
    """

    def __init__(self, network: nn.Module, module_name: str = "bottleneck") -> None:
        self.module_name = module_name
        self.module = resolve_submodule(network, module_name)
        self._output: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._store)

    def _store(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not isinstance(output, torch.Tensor):
            # a tuple/dict latent cannot be flattened into one distribution for Eq. 3
            raise TypeError(
                f"bottleneck submodule {self.module_name!r} returned {type(output).__name__}; "
                "a single tensor is required. Hook a submodule that outputs the latent tensor itself."
            )
        self._output = output

    @property
    def output(self) -> torch.Tensor:
        """The bottleneck's output from the latest forward pass since the last :meth:`clear`."""
        if self._handle is None:
            raise RuntimeError(f"the hook on {self.module_name!r} has been removed.")
        if self._output is None:
            raise RuntimeError(
                f"no bottleneck output captured from submodule {self.module_name!r}: run the network forward "
                "first, and check that this submodule is actually called by the network's forward()."
            )
        return self._output

    def clear(self) -> None:
        """Forget the captured output, so that a forward pass that skips the bottleneck cannot reuse a stale one."""
        self._output = None

    def remove(self) -> None:
        """Detach the hook from the network and drop the captured output; safe to call twice."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._output = None
