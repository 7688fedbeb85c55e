"""The frozen multi-modal Teacher of KD-Net as an Ignite handler.

The Teacher ``f_t`` is trained first (the ``teacher`` bundle) and only provides targets for the
Student: its soft labels for ``L_KD`` (Eq. 1--2) and its bottleneck ``E_t(x)`` for ``L_KL``
(Eq. 3). :class:`FrozenTeacher` loads its checkpoint before the first iteration and, at the start
of every iteration, writes the Teacher's outputs into the batch, where :class:`KDTrainer` (or any
``iteration_update``) finds them next to the Student's input.

The teacher bundle's ``model.pt`` records what its network was trained for next to the weights
(:class:`CheckpointRecord`, key ``"record"``: the head ``activation`` and the input ``modalities``),
and :class:`FrozenTeacher` refuses a checkpoint whose record disagrees with the Student's
configuration: a softmax Student cannot learn from sigmoid region channels, and a Teacher fed its
modalities in another order computes garbage without any shape error.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from .bottleneck import BottleneckHook, unwrap_module
from .distillation import FeatureHooks
from .regions import ACTIVATIONS, check_activation, head_channels

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["RECORD_KEY", "CheckpointRecord", "FrozenTeacher", "check_teacher_record", "load_teacher_weights"]

#: key of a ``model.pt`` holding its :class:`CheckpointRecord` (next to ``"model"``, the state dict)
RECORD_KEY = "record"

TRAIN_TEACHER_HINT = (
    "Set the config key `teacher_ckpt` to the trained teacher's weights, or produce them by training the "
    "teacher bundle first, e.g. `python -m monai.bundle run --bundle_root bundles/teacher "
    "--config_file bundles/teacher/configs/train.json` (it writes bundles/teacher/models/model.pt)."
)


def _read_checkpoint(path: Path) -> object:
    """``torch.load`` restricted to tensors and plain containers, with messages that name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"Teacher checkpoint not found: '{path}'. {TRAIN_TEACHER_HINT}")
    try:
        # weights_only: the unpickler only rebuilds tensors and plain containers and runs no code
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Refusing to load teacher checkpoint '{path}': it is not a plain state dict of tensors (it "
            "contains other Python objects, which could run code when unpickled). Re-save it as "
            "`torch.save({'model': network.state_dict()}, path)` from a trusted environment."
        ) from err
    except RuntimeError as err:  # e.g. a truncated or non-PyTorch file
        raise RuntimeError(f"Could not read teacher checkpoint '{path}': {err}") from err


def _extract_state_dict(checkpoint: object, path: Path) -> Mapping[str, torch.Tensor]:
    """Accept ``{"model": state_dict, ...}`` (the project's convention) or a bare state dict."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if (
        not isinstance(state, Mapping)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise ValueError(
            f"Teacher checkpoint '{path}' holds {type(state).__name__}, not a state dict: expected a non-empty "
            "mapping of parameter names to tensors, either bare or under the key 'model'."
        )
    return state


class CheckpointRecord:
    """What a network was trained for, saved in its ``model.pt`` under :data:`RECORD_KEY`.

    Put it into the best-model saver's ``save_dict`` next to the network (``{"model": network,
    "record": CheckpointRecord(...)}``): Ignite saves each entry's ``state_dict()``, so the file holds
    ``{"model": <state dict>, "record": {"activation": "sigmoid", "modalities": ["t1", "t1ce", "t2", "flair"]}}``
    (plain strings, loadable with ``weights_only=True``). Loaders that read ``"model"`` are unaffected.

    Args:
        activation: the network's head, one of :data:`~brats_kd.regions.ACTIVATIONS`.
        modalities: its input channels, in order (the bundle's ``modalities`` config value).
    """

    def __init__(self, activation: str, modalities: Sequence[str]) -> None:
        self.activation = check_activation(activation)
        if isinstance(modalities, str) or not modalities or not all(isinstance(m, str) for m in modalities):
            raise ValueError(f"modalities must be a non-empty list of modality names, got {modalities!r}.")
        self.modalities = list(modalities)

    def state_dict(self) -> dict:
        return {"activation": self.activation, "modalities": list(self.modalities)}


def _head_channels(state: Mapping[str, torch.Tensor]) -> int | None:
    """Output channels of the network's last convolution (``[out, in, *kernel]``), i.e. of its head."""
    last = next((k for k in reversed(list(state)) if k.endswith("weight") and state[k].ndim >= 3), None)
    return int(state[last].shape[0]) if last is not None else None


def check_teacher_record(
    checkpoint: object,
    path: str | os.PathLike,
    activation: str | None = None,
    modalities: Sequence[str] | None = None,
) -> None:
    """Refuse a teacher checkpoint trained for another head ``activation`` or other input ``modalities``.

    ``checkpoint`` is the loaded file. With a :class:`CheckpointRecord` (key ``"record"``) both values are
    compared with it (``modalities`` in order: channel ``i`` of the teacher's input is ``modalities[i]``).
    A checkpoint written before the record existed is checked for what its weights show: the head's output
    channels (3: sigmoid, 4: softmax); the number of input channels is checked when the weights are loaded.
    ``None`` skips a check.

    Raises:
        ValueError: a mismatch; the message names the checkpoint, the recorded and the configured values.
    """
    if activation is not None:
        check_activation(activation)
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, Mapping) else None
    problems = []
    if isinstance(record, Mapping):
        if activation is not None and record.get("activation") != activation:
            problems.append(
                f"it was trained with activation {record.get('activation')!r} but the student is configured with "
                f"activation {activation!r} (config key `activation`)"
            )
        if modalities is not None and list(record.get("modalities", [])) != list(modalities):
            problems.append(
                f"it was trained on modalities {list(record.get('modalities', []))} but the student's "
                f"teacher_modalities are {list(modalities)} (channel order matters)"
            )
    elif activation is not None:
        state = _extract_state_dict(checkpoint, Path(path))
        channels = _head_channels(state)
        by_channels = {head_channels(a): a for a in ACTIVATIONS}
        if channels in by_channels and by_channels[channels] != activation:
            problems.append(
                f"it records no activation (written before records existed) and its head has {channels} output "
                f"channels, the {by_channels[channels]!r} head's, but the student is configured with activation "
                f"{activation!r} (config key `activation`)"
            )
    if problems:
        raise ValueError(
            f"Refusing teacher checkpoint '{path}': " + "; ".join(problems)
            + ". Train the teacher with the student's settings (the same `activation` and `modalities`), or "
            "set the student's to the teacher's."
        )


def _first_conv_weight(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first ``[out, in, *kernel]`` weight, whose dim 1 is the network's input channel count."""
    return next((k for k, v in state.items() if k.endswith("weight") and v.ndim >= 3), None)


def _check_compatible(network: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Explain a checkpoint/network mismatch before ``load_state_dict`` reports it tersely."""
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    first_conv = _first_conv_weight(expected)
    if first_conv in mismatched and state[first_conv].ndim >= 2:
        saved_in, net_in = state[first_conv].shape[1], expected[first_conv].shape[1]
        if saved_in != net_in:
            problems.append(
                f"teacher checkpoint expects {saved_in} input channels but the configured teacher network has "
                f"{net_in} (check the teacher's modalities / in_channels)"
            )
    if mismatched:
        shown = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in mismatched[:5])
        problems.append(f"{len(mismatched)} shape mismatch(es), checkpoint vs network: {shown}")
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint, e.g. {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint, e.g. {unexpected[:5]}")
    raise RuntimeError(
        f"Teacher checkpoint '{path}' does not match the configured teacher network: " + "; ".join(problems)
        + ". The teacher network definition must be the one the teacher bundle was trained with."
    )


def load_teacher_weights(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    activation: str | None = None,
    modalities: Sequence[str] | None = None,
) -> None:
    """Load a teacher checkpoint into ``network`` strictly and safely, after :func:`check_teacher_record`.

    Raises:
        FileNotFoundError: no such file (the message says how to produce it).
        ValueError: the file holds anything but tensors in plain containers, or no state dict, or it was
            trained for another ``activation`` / other ``modalities``.
        RuntimeError: the file is unreadable, or its keys/shapes do not match ``network``.
    """
    path = Path(checkpoint)
    content = _read_checkpoint(path)
    check_teacher_record(content, path, activation, modalities)
    state = _extract_state_dict(content, path)
    model = unwrap_module(network)  # checkpoints are saved without the DDP "module." prefix
    _check_compatible(model, state, path)
    model.load_state_dict(state, strict=True)


class FrozenTeacher:
    """Ignite handler running a frozen, pre-trained Teacher on each batch before the Student's step.

    On ``Events.STARTED`` (before the first iteration) the checkpoint is loaded with
    ``weights_only=True`` and ``strict=True``, and the network is moved to ``device``, put in eval
    mode and given ``requires_grad=False``. On every ``Events.ITERATION_STARTED`` the Teacher is
    run under ``torch.no_grad()`` on ``batch[image_key]`` and its logits and bottleneck are stored
    in ``batch[logits_key]`` and ``batch[bottleneck_key]`` (on ``device``, without metadata).

    ``no_grad`` rather than ``inference_mode`` by default: the outputs become loss targets, and autograd
    may save them for the backward pass, which inference tensors forbid (``inference_mode=True`` copies
    them out of inference mode instead). Eval mode is re-asserted
    before every forward, so a stray ``train()`` call can neither switch BatchNorm to batch
    statistics (changing the targets and the running buffers) nor enable dropout.

    Args:
        network: the Teacher, same architecture as the Student but with the Teacher's input channels.
        checkpoint: path of the Teacher's weights (``{"model": state_dict}`` or a bare state dict).
        image_key: batch key of the Teacher's (multi-modal) input.
        logits_key: batch key to write the Teacher's logits to.
        bottleneck_key: batch key to write the Teacher's bottleneck to.
        bottleneck: name of the Teacher's bottleneck submodule (dotted path allowed), or ``None``
            when ``L_KL`` is not used (``alpha = 0``), which skips the hook.
        device: where to run the Teacher; default: the engine's device.
        amp: run the Teacher under ``torch.autocast`` (CUDA only; ignored on CPU).
        cpu_bf16: on CPU, run the Teacher under ``torch.autocast("cpu", dtype=torch.bfloat16)``; its
            outputs are returned as float32. Opt-in: on CPUs with native bf16 (AVX-512 BF16, AMX) the
            forward is ~2.5x faster; logits move by a few hundredths (docs/performance.md); on CPUs
            without it bf16 is slower than float32. Ignored on CUDA (use ``amp``).
        autocast_dtype: on any device, run the Teacher under ``torch.autocast(<device type>, dtype)``
            (``"bfloat16"`` / ``"float16"`` or a ``torch.dtype``; the GPU path passes
            ``brats_kd.device.autocast_dtype(device)``); outputs are returned as float32. Takes precedence
            over ``amp`` and ``cpu_bf16``; ``None``: as those say.
        inference_mode: run the forward under ``torch.inference_mode()`` rather than ``no_grad`` (no
            version counters or view tracking); the outputs are then copied out of inference mode (as
            float32), so that the losses' autograd may save them.
        activation: the Student's head; a checkpoint trained for the other one is refused when loaded
            (:func:`check_teacher_record`). ``None``: not checked.
        modalities: the Teacher's input modalities as the Student feeds them; a checkpoint recording
            others (or another order) is refused. ``None``: not checked.
        feature_levels: names of Teacher submodules (e.g. decoder blocks ``"decoder.3"``) whose outputs the
            other distillation methods compare (:mod:`brats_kd.distillation`); written to
            ``batch[features_key]`` as ``{name: tensor}``. Empty / ``None`` (KD-Net): no hooks.
        features_key: batch key of the Teacher's features.

    Example config::

        "teacher": {"_target_": "scripts.teacher.FrozenTeacher", "network": "@teacher_network",
                    "checkpoint": "@teacher_ckpt", "amp": "@amp"}
    """

    def __init__(
        self,
        network: nn.Module,
        checkpoint: str | os.PathLike,
        image_key: str = "teacher_image",
        logits_key: str = "teacher_logits",
        bottleneck_key: str = "teacher_bottleneck",
        bottleneck: str | None = "bottleneck",
        device: str | torch.device | None = None,
        amp: bool = False,
        cpu_bf16: bool = False,
        autocast_dtype: str | torch.dtype | None = None,
        inference_mode: bool = False,
        activation: str | None = None,
        modalities: Sequence[str] | None = None,
        feature_levels: Sequence[str] | None = None,
        features_key: str = "teacher_features",
    ) -> None:
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path, got {type(checkpoint).__name__}.")
        for name, key in (("image_key", image_key), ("logits_key", logits_key), ("bottleneck_key", bottleneck_key)):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name} must be a non-empty string, got {key!r}.")
        self.network = network
        self.checkpoint = checkpoint
        self.image_key = image_key
        self.logits_key = logits_key
        self.bottleneck_key = bottleneck_key
        # resolved now, so a wrong bottleneck name fails when the config is parsed
        self.hook = BottleneckHook(network, bottleneck) if bottleneck is not None else None
        self.feature_hooks = FeatureHooks(network, feature_levels) if feature_levels else None
        self.features_key = features_key
        self.features: dict[str, torch.Tensor] | None = None  # of the latest infer(), with feature_levels
        self.device = torch.device(device) if device is not None else None
        self.amp = bool(amp)
        self.cpu_bf16 = bool(cpu_bf16)
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16}
        if isinstance(autocast_dtype, str) and autocast_dtype not in dtypes:
            raise ValueError(f"autocast_dtype must be 'bfloat16', 'float16' or None, got {autocast_dtype!r}.")
        self.autocast_dtype = dtypes.get(autocast_dtype, autocast_dtype) if isinstance(autocast_dtype, str) else autocast_dtype
        self.inference_mode = bool(inference_mode)
        self.activation = check_activation(activation) if activation is not None else None
        self.modalities = list(modalities) if modalities is not None else None
        self._ready = False

    def attach(self, engine) -> None:
        """Load the Teacher when ``engine`` starts and run it at the start of each of its iterations."""
        if not engine.has_event_handler(self.load_for_engine, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self.load_for_engine)
        if not engine.has_event_handler(self, Events.ITERATION_STARTED):
            engine.add_event_handler(Events.ITERATION_STARTED, self)

    def load_for_engine(self, engine) -> None:
        """``Events.STARTED`` handler: :meth:`load` on ``device`` or else the engine's device."""
        self.load(self.device if self.device is not None else getattr(engine.state, "device", None))

    def load(self, device: str | torch.device | None = None) -> None:
        """Load the checkpoint (see :func:`load_teacher_weights`) and freeze the Teacher on ``device`` (default CPU)."""
        self._ready = False
        load_teacher_weights(self.network, self.checkpoint, self.activation, self.modalities)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.network.to(self.device).eval().requires_grad_(False)
        self._ready = True

    def infer(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher logits and bottleneck (``None`` without a hook) for ``image``, on the Teacher's device."""
        if not self._ready:
            raise RuntimeError("FrozenTeacher.infer() called before load(): attach it to the trainer or call load().")
        if isinstance(image, MetaTensor):
            image = image.as_tensor()  # targets need no metadata; plain tensors keep the loss cheap
        image = image.to(self.device, non_blocking=True)
        self.network.eval()
        if self.hook is not None:
            self.hook.clear()
        if self.feature_hooks is not None:
            self.feature_hooks.clear()
        with torch.inference_mode() if self.inference_mode else torch.no_grad(), self._autocast():
            logits = self.network(image)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"the teacher network returned {type(logits).__name__}; a logits tensor is required "
                "(disable deep supervision / multiple outputs in the teacher network definition)."
            )
        bottleneck = self.hook.output if self.hook is not None else None
        features = self.feature_hooks.outputs if self.feature_hooks is not None else None
        if self.inference_mode or self.autocast_dtype is not None:
            # float32 targets; a copy made here, outside inference mode, is an ordinary tensor autograd can save
            logits = logits.to(torch.float32, copy=self.inference_mode)
            bottleneck = bottleneck.to(torch.float32, copy=self.inference_mode) if bottleneck is not None else None
            if features is not None:
                features = {k: v.to(torch.float32, copy=self.inference_mode) for k, v in features.items()}
        elif self.device.type == "cpu" and self.cpu_bf16:
            # the KD and KL losses (sigmoid / softmax at T, softmax over the bottleneck) stay in float32
            logits = logits.float()
            bottleneck = bottleneck.float() if bottleneck is not None else None
            features = {k: v.float() for k, v in features.items()} if features is not None else None
        self.features = features
        return logits, bottleneck

    def _autocast(self):
        if self.autocast_dtype is not None:
            return torch.autocast(self.device.type, dtype=self.autocast_dtype)
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda")
        if self.device.type == "cpu" and self.cpu_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self, engine) -> None:
        """``Events.ITERATION_STARTED`` handler: add the Teacher's outputs to ``engine.state.batch``."""
        batch = engine.state.batch
        if not isinstance(batch, dict):
            raise TypeError(f"FrozenTeacher needs dictionary batches, got {type(batch).__name__}.")
        if self.image_key not in batch:
            raise KeyError(
                f"the batch has no teacher input {self.image_key!r} (keys: {sorted(batch)}); "
                "check the preprocessing keys and FrozenTeacher's image_key."
            )
        logits, bottleneck = self.infer(batch[self.image_key])
        batch[self.logits_key] = logits
        if bottleneck is not None:
            batch[self.bottleneck_key] = bottleneck
        if self.features is not None:
            batch[self.features_key] = self.features
