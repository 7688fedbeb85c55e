"""The device-dependent parts of training: mixed precision, cuDNN settings, per-rank data, memory layout.

The bundles' ``configs/gpu.json`` (merged after ``train.json``) names most of these functions; ``train.json``
itself uses only :func:`place_network` (the training network on its device, channels-last). Everything here
also runs on the CPU (autocast in bfloat16, no GradScaler), which is how it is tested without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from .config import as_flag

__all__ = [
    "AutocastInferer",
    "autocast_dtype",
    "channels_last",
    "configure_backends",
    "every_n_iterations",
    "output_loss",
    "needs_grad_scaler",
    "place_network",
    "rank_partition",
]

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def autocast_dtype(device: str | torch.device, prefer: str | None = None) -> torch.dtype:
    """The autocast dtype for ``device``: bfloat16 where the device has it, else float16.

    bfloat16 has float32's exponent range, so gradients cannot overflow and no GradScaler is
    needed (no skipped steps, no host sync for the scaler's inf check). CUDA GPUs before Ampere
    (V100, T4) lack it and get float16, which needs a GradScaler (:func:`needs_grad_scaler`).
    On the CPU autocast supports bfloat16 only (fast with AVX-512 BF16 / AMX, slow without).

    Args:
        device: the training device.
        prefer: ``"bfloat16"`` or ``"float16"`` to force one (``float16`` is refused on the CPU).
    """
    device = _device(device)
    if prefer is not None:
        if prefer not in _DTYPES:
            raise ValueError(f"prefer must be one of {sorted(_DTYPES)}, got {prefer!r}")
        dtype = _DTYPES[prefer]
        if device.type == "cpu" and dtype == torch.float16:
            raise ValueError("float16 autocast is not supported for training on the CPU; use bfloat16.")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    raise ValueError(f"no autocast dtype known for device type {device.type!r}")


def needs_grad_scaler(device: str | torch.device, dtype: torch.dtype) -> bool:
    """True for float16 on CUDA: its gradients underflow without loss scaling. Used as the trainer's ``amp``
    (MONAI then creates a GradScaler and autocasts with ``amp_kwargs``); bfloat16 runs without one."""
    return _device(device).type == "cuda" and dtype == torch.float16


def configure_backends(device: str | torch.device, deterministic: bool = False) -> torch.device:
    """Choose speed or reproducibility for CUDA kernels; returns ``device`` (as a ``torch.device``).

    ``monai.utils.set_determinism`` (every bundle's ``initialize``) turns ``cudnn.deterministic`` on and
    ``cudnn.benchmark`` off, which makes 3-D convolutions slow without making CUDA runs bit-reproducible
    (trilinear up-sampling's backward uses atomics). So on CUDA:

    * ``deterministic=False`` (the GPU default): ``cudnn.benchmark = True`` (cuDNN times its algorithms
      for each input shape once; the bundles train on one shape), ``cudnn.deterministic = False``.
    * ``deterministic=True``: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (warns, rather
      than fails, on the ops that have no deterministic kernel) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
      unless already set; ``cudnn.benchmark = False``.

    Called from a config value (``train#trainer#device``), i.e. after ``initialize`` has run
    ``set_determinism``, whose settings it replaces. On the CPU it changes nothing.
    """
    device = _device(device)
    if device.type != "cuda":
        return device
    deterministic = as_flag(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device


def channels_last(network: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """``network`` with its 3-D convolution weights in channels-last (NDHWC) layout when ``enabled``.

    The convolutions' outputs then stay channels-last, which oneDNN runs faster on the CPU (a KD-Net
    training step at 32³, batch 2, one thread: 0.124 s against 0.149 s; docs/performance.md §9). The weights
    are the same numbers in another memory order: ``model.pt`` loads into a network of either layout.
    Networks with 4-D (2-D convolution) weights or without 5-D ones are returned unchanged.
    """
    dims = {p.dim() for p in network.parameters()}
    if not as_flag(enabled) or 5 not in dims or 4 in dims:  # channels_last_3d would refuse a 4-D weight
        return network
    return network.to(memory_format=torch.channels_last_3d)


def place_network(network: torch.nn.Module, device: str | torch.device, channels_last_3d: bool = True) -> torch.nn.Module:
    """``network`` on ``device``, in channels-last layout when ``channels_last_3d`` (:func:`channels_last`).

    The training configs' ``network`` (``"_target_": "brats_kd.device.place_network"``).
    """
    return channels_last(network, channels_last_3d).to(_device(device))


def _to_float32(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, (list, tuple)):
        return type(output)(_to_float32(o) for o in output)
    if isinstance(output, dict):
        return {k: _to_float32(v) for k, v in output.items()}
    return output


class AutocastInferer(Inferer):
    """Run ``inferer`` with every network call under ``torch.autocast(<input device type>, dtype)``,
    returning float32 outputs.

    Only the network's forward is autocast: losses, sliding-window aggregation and post-processing
    see float32 tensors, and the backward pass runs outside autocast (as PyTorch recommends).
    Forward hooks (the KD student's bottleneck) see the reduced-precision activations; the KD-Net
    losses cast them to float32 themselves.

    Args:
        inferer: any MONAI inferer (``SimpleInferer``, ``SlidingWindowInferer``, ...).
        dtype: ``torch.bfloat16`` / ``torch.float16`` (or their names); ``None`` = no autocast.
    """

    def __init__(self, inferer: Inferer, dtype: torch.dtype | str | None) -> None:
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}")
            dtype = _DTYPES[dtype]
        if dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be bfloat16, float16 or None, got {dtype}")
        self.inferer = inferer
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        if self.dtype is None:
            return self.inferer(inputs, network, *args, **kwargs)

        def forward(x: torch.Tensor, *a: Any, **k: Any) -> Any:
            with torch.autocast(x.device.type, dtype=self.dtype):
                output = network(x, *a, **k)
            return _to_float32(output)

        return self.inferer(inputs, forward, *args, **kwargs)


def rank_partition(data: Sequence, seed: int = 0, even_divisible: bool = True, rank: int | None = None,
                   world_size: int | None = None) -> list:
    """This process's share of ``data`` under ``torch.distributed`` (all of it otherwise).

    With a ``DistributedSampler`` every rank's ``CacheDataset`` caches the *whole* list and the
    sampler then picks a shard: at full BraTS resolution (~250 MB per case) that is the data set's
    size in RAM per GPU. Partitioning the list first (MONAI's ``partition_dataset``, shuffled with
    ``seed``) caches each case on one rank only; the data loader then needs no sampler.
    ``even_divisible=True`` (training) repeats a few cases so that every rank runs the same number of
    iterations; ``False`` (validation, whose metrics are gathered over ranks) keeps each case once.
    """
    from monai.data import partition_dataset

    if world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
    if rank is None or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    if world_size == 1:
        return list(data)
    if len(data) < world_size:
        raise ValueError(f"{len(data)} cases cannot be shared by {world_size} processes: every rank needs at least one")
    return list(partition_dataset(list(data), num_partitions=world_size, shuffle=True, seed=int(seed),
                                  even_divisible=bool(even_divisible))[rank])


def every_n_iterations(n: int) -> Callable[[Any, int], bool]:
    """An Ignite event filter (``StatsHandler(iteration_log=...)``) that is true every ``n``-th iteration.

    Logging a loss reads it on the host (``.item()``), which waits for the GPU: logging every
    iteration puts a host-device synchronisation into every step.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")

    def every(engine: Any, event: int) -> bool:
        return event % n == 0

    return every


def output_loss(output: Any) -> Any:
    """``output_transform`` of the loss loggers: ``output["loss"]`` of a batch-level output dict, or of the
    first item of a decollated list (``from_engine(["loss"], first=True)`` returns a tuple for a dict, which
    the loggers ignore; with ``decollate: false`` the trainer's output is a dict)."""
    if isinstance(output, (list, tuple)):
        if not output:
            raise ValueError("empty engine output: no loss to log")
        output = output[0]
    return output["loss"]
