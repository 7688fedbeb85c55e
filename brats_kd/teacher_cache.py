"""Cached Teacher targets: run the frozen Teacher once per training case instead of on every batch.

In ``teacher_mode: cached`` the Teacher's logits and bottleneck are computed once, by the
``configs/cache_teacher.json`` step, on each training case's *deterministic* pre-processing
output (z-scored, cropped, resized; before any random flip), and stored per case as float16.
Training then loads them with :class:`LoadTeacherTargetsd` right after the deterministic
transforms (so ``CacheDataset`` keeps them in memory) and flips them with the image, which
removes the Teacher's forward pass from every training step.

A stored target is the average over the 8 flips ``g`` of the three spatial axes::

    T(x) = 1/8 sum_g g^-1( f_t(g(x)) )          (logits and bottleneck alike)

Because the flips form a group, ``T(h(x)) = h(T(x))`` for every flip ``h``: flipping a cached
target is *exactly* what the Teacher (with this test-time augmentation) would output for the
flipped image, so the random flips of training stay consistent with the targets. A single
forward pass has no such property (convolution kernels are not symmetric), which is why the
cache stores the flip average and not ``f_t(x)``.

Files in ``cache_dir``: ``<case>.pt`` (``{"teacher_logits": [C, *S], "teacher_bottleneck": [F, *s]}``,
float16 tensors, loadable with ``torch.load(..., weights_only=True)``), ``manifest.json`` (per case:
the file, the Teacher checkpoint's SHA-256 and the pre-processing settings it was computed with)
and ``summary.json`` (written last; its presence marks a complete cache). Every file is written
atomically, and a rerun recomputes only the cases whose manifest entry does not match.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Transform

from .io import atomic_write as _write_atomic
from .io import write_json_atomic as _write_json
from .teacher import TRAIN_TEACHER_HINT, FrozenTeacher

__all__ = [
    "CACHE_FORMAT",
    "TARGET_KEYS",
    "LoadTeacherTargetsd",
    "TeacherTargetCache",
    "file_sha256",
    "flip_tta",
    "spatial_flips",
]

logger = logging.getLogger(__name__)

#: version of the on-disk layout; a manifest of another version is ignored (everything is recomputed)
CACHE_FORMAT = 1
#: batch keys of the Teacher's logits and bottleneck, as read by ``KDTrainer``
TARGET_KEYS = ("teacher_logits", "teacher_bottleneck")
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
FLOAT16_MAX = torch.finfo(torch.float16).max


def spatial_flips(spatial_dims: int = 3) -> list[tuple[int, ...]]:
    """All ``2 ** spatial_dims`` flips of a ``[B, C, *spatial]`` tensor, as tuples of dims to flip (``()`` = identity)."""
    axes = range(2, 2 + spatial_dims)
    return [subset for r in range(spatial_dims + 1) for subset in itertools.combinations(axes, r)]


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, dims) if dims else x


def flip_tta(
    infer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]], image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip test-time augmentation over all spatial flips: ``1/|G| sum_g g^-1(infer(g(image)))``.

    Args:
        infer: ``image -> (logits, bottleneck or None)``, e.g. :meth:`FrozenTeacher.infer`.
        image: ``[B, C, *spatial]``.

    Returns:
        the averaged logits and bottleneck (``None`` if ``infer`` returns none), float32. The
        bottleneck's own spatial axes are flipped back, whatever their size.
    """
    flips = spatial_flips(image.ndim - 2)
    logits_sum: torch.Tensor | None = None
    bottleneck_sum: torch.Tensor | None = None
    for dims in flips:
        logits, bottleneck = infer(_flip(image, dims))
        logits = _flip(logits.float(), dims)
        logits_sum = logits if logits_sum is None else logits_sum + logits
        if bottleneck is not None:
            bottleneck = _flip(bottleneck.float(), dims)
            bottleneck_sum = bottleneck if bottleneck_sum is None else bottleneck_sum + bottleneck
    n = float(len(flips))
    return logits_sum / n, (bottleneck_sum / n if bottleneck_sum is not None else None)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (identifies the Teacher checkpoint the targets came from)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists), so stored and current settings compare equal."""
    return json.loads(json.dumps(value))


def _case_file(case_id: str) -> str:
    """A file name for ``case_id``; ids with characters unsafe in file names get a hash suffix against collisions."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", case_id)
    if safe != case_id or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(case_id.encode()).hexdigest()[:8]}"
    return f"{safe}.pt"


def _read_manifest(cache_dir: Path) -> dict[str, dict]:
    """``{case_id: entry}`` of ``cache_dir``'s manifest; empty when there is none or it has another format."""
    path = cache_dir / MANIFEST
    if not path.is_file():
        return {}
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        return {}
    return dict(manifest.get("cases", {}))


def _check_outside(cache_dir: Path, dataset_dir: str | os.PathLike | None) -> None:
    if not dataset_dir:
        return
    data = Path(dataset_dir).expanduser().resolve()
    if cache_dir == data or data in cache_dir.parents:
        raise ValueError(
            f"teacher_cache_dir '{cache_dir}' is inside the data folder '{data}'; derived files must never be "
            "written into the data set: choose a folder outside it."
        )


class TeacherTargetCache:
    """The cache step: the frozen Teacher's flip-averaged targets (:func:`flip_tta`) for every case, stored as float16.

    :meth:`run` hashes the Teacher checkpoint, skips the cases whose manifest entry was computed
    with the same checkpoint and ``preprocessing`` settings (and whose file exists), runs the
    Teacher on the others through ``transform`` (the *deterministic* training pre-processing) and
    writes ``<case>.pt``, the manifest after each case (an interrupted run keeps its finished
    cases) and finally ``summary.json``.

    Args:
        teacher: the :class:`FrozenTeacher` (network, checkpoint, input key, bottleneck name, AMP).
        cases: datalist entries (each with ``case_key``), e.g. the fold's training cases.
        transform: deterministic pre-processing producing ``teacher.image_key`` for one case; must not
            contain random transforms (the targets would not match the flips applied in training).
        cache_dir: output folder (created); must lie outside ``dataset_dir``.
        preprocessing: settings that determine the Teacher's input (modalities, crop and resize
            sizes, ...), recorded in the manifest; a change invalidates the cached cases.
        dataset_dir: the data folder, which ``cache_dir`` may not be inside.
        case_key: key of the case identifier in each entry.
        device: where to run the Teacher (default CPU).
        num_workers: data-loading worker processes.
    """

    def __init__(
        self,
        teacher: FrozenTeacher,
        cases: Sequence[Mapping],
        transform: Callable,
        cache_dir: str | os.PathLike,
        preprocessing: Mapping | None = None,
        dataset_dir: str | os.PathLike | None = None,
        case_key: str = "case_id",
        device: str | torch.device | None = None,
        num_workers: int = 0,
    ) -> None:
        if not isinstance(teacher, FrozenTeacher):
            raise TypeError(f"teacher must be a scripts.teacher.FrozenTeacher, got {type(teacher).__name__}.")
        ids = [c.get(case_key) for c in cases]
        if any(not isinstance(i, str) or not i for i in ids):
            raise ValueError(f"every case needs a non-empty string {case_key!r}; got {ids[:5]}...")
        if len(set(ids)) != len(ids):
            raise ValueError(f"case ids must be unique; duplicated: {sorted({i for i in ids if ids.count(i) > 1})[:5]}")
        self.teacher = teacher
        self.cases = list(cases)
        self.transform = transform
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        _check_outside(self.cache_dir, dataset_dir)
        self.preprocessing = _plain(dict(preprocessing or {}))
        self.case_key = case_key
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_workers = int(num_workers)

    def cache_key(self, teacher_sha256: str) -> dict:
        """What a case's targets depend on, stored with each manifest entry."""
        return {
            "teacher_checkpoint_sha256": teacher_sha256,
            "tta": f"mean over {len(spatial_flips())} spatial flips",
            "preprocessing": self.preprocessing,
        }

    def _is_cached(self, entry: Mapping | None, key: Mapping) -> bool:
        return (
            entry is not None
            and all(entry.get(k) == v for k, v in key.items())
            and (self.cache_dir / str(entry.get("file", ""))).is_file()
        )

    def _save(self, case_id: str, logits: torch.Tensor, bottleneck: torch.Tensor | None) -> str:
        targets = {TARGET_KEYS[0]: logits}
        if bottleneck is not None:
            targets[TARGET_KEYS[1]] = bottleneck
        for name, value in targets.items():
            if not torch.isfinite(value).all() or value.abs().max() > FLOAT16_MAX:
                raise ValueError(f"case {case_id!r}: the Teacher's {name} are not finite or exceed the float16 range.")
        half = {name: value.detach().to("cpu", torch.float16).contiguous() for name, value in targets.items()}
        name = _case_file(case_id)
        _write_atomic(self.cache_dir / name, lambda handle: torch.save(half, handle))
        return name

    def run(self) -> dict:
        """Compute the missing targets; returns (and writes) the summary ``{cases, computed, skipped, seconds, ...}``."""
        start = time.monotonic()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / SUMMARY).unlink(missing_ok=True)  # present again only once every case is cached
        if not Path(self.teacher.checkpoint).is_file():
            raise FileNotFoundError(f"Teacher checkpoint not found: '{self.teacher.checkpoint}'. {TRAIN_TEACHER_HINT}")
        key = self.cache_key(file_sha256(self.teacher.checkpoint))
        manifest = _read_manifest(self.cache_dir)
        pending = [c for c in self.cases if not self._is_cached(manifest.get(c[self.case_key]), key)]
        logger.info(
            f"teacher cache {self.cache_dir}: {len(self.cases) - len(pending)} of {len(self.cases)} cases up to date, "
            f"computing {len(pending)}"
        )
        if pending:
            self.teacher.load(self.device)
            loader = DataLoader(Dataset(pending, self.transform), batch_size=1, num_workers=self.num_workers)
            for done, batch in enumerate(loader, 1):
                case_id = batch[self.case_key][0]
                tic = time.monotonic()
                logits, bottleneck = flip_tta(self.teacher.infer, batch[self.teacher.image_key])
                manifest[case_id] = {"file": self._save(case_id, logits[0], None if bottleneck is None else bottleneck[0]), **key}
                _write_json(self.cache_dir / MANIFEST, {"format": CACHE_FORMAT, "cases": manifest})
                logger.info(f"teacher cache: {done}/{len(pending)} {case_id} ({time.monotonic() - tic:.1f} s)")
        summary = {
            "cases": len(self.cases),
            "computed": len(pending),
            "skipped": len(self.cases) - len(pending),
            "seconds": round(time.monotonic() - start, 1),
            **key,
        }
        _write_json(self.cache_dir / SUMMARY, summary)
        return summary


class LoadTeacherTargetsd(Transform):
    """Add a case's cached Teacher targets (``teacher_logits``, ``teacher_bottleneck``) to its data dictionary.

    Place it after the deterministic pre-processing and before the random transforms, and add the
    target keys to the random flips: a flipped target equals the Teacher's flip-averaged output for
    the flipped image (see the module docstring). The targets are returned as float32 tensors.

    The manifest is read when the transform is built, which fails early and clearly when
    ``expected_cases`` are missing from the cache or were computed with another Teacher checkpoint
    (checked when ``teacher_checkpoint`` exists; in cached mode the Teacher itself is not needed) or
    other ``preprocessing`` settings. At call time the targets' spatial shape is checked against
    ``image_key``'s.

    Args:
        cache_dir: the folder written by :class:`TeacherTargetCache`.
        keys: the batch keys to fill, among ``TARGET_KEYS``.
        case_key: key of the case identifier in the data dictionary.
        image_key: the network input whose spatial shape the logits must have (``None``: no check).
        teacher_checkpoint: the Teacher whose targets are expected.
        preprocessing: the settings the targets must have been computed with (as given to the cache step).
        expected_cases: case ids that must all be cached (e.g. the fold's training cases).
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        keys: Sequence[str] = TARGET_KEYS,
        case_key: str = "case_id",
        image_key: str | None = "image",
        teacher_checkpoint: str | os.PathLike | None = None,
        preprocessing: Mapping | None = None,
        expected_cases: Iterable[str] | None = None,
    ) -> None:
        unknown = [k for k in keys if k not in TARGET_KEYS]
        if unknown or not keys:
            raise ValueError(f"keys must be a non-empty subset of {TARGET_KEYS}, got {list(keys)}.")
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.keys = tuple(keys)
        self.case_key = case_key
        self.image_key = image_key
        manifest_file = self.cache_dir / MANIFEST
        if not manifest_file.is_file():
            raise FileNotFoundError(
                f"no teacher cache in '{self.cache_dir}' ({MANIFEST} missing). Build it first: python -m monai.bundle run "
                "--config_file \"['configs/train.json','configs/cache_teacher.json']\" (same overrides as the training), "
                "or train with teacher_mode 'online'."
            )
        self.manifest = _read_manifest(self.cache_dir)
        self._check(expected_cases, teacher_checkpoint, preprocessing)

    def _check(self, expected_cases, teacher_checkpoint, preprocessing) -> None:
        expected = list(expected_cases) if expected_cases is not None else list(self.manifest)
        missing = [c for c in expected if c not in self.manifest or not (self.cache_dir / self.manifest[c]["file"]).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(expected)} cases have no cached teacher targets in '{self.cache_dir}' "
                f"(e.g. {missing[:3]}): rerun the cache step (configs/cache_teacher.json) with the training's overrides."
            )
        problems = []
        if teacher_checkpoint is not None and Path(teacher_checkpoint).is_file():
            sha = file_sha256(teacher_checkpoint)
            stale = [c for c in expected if self.manifest[c].get("teacher_checkpoint_sha256") != sha]
            if stale:
                problems.append(f"{len(stale)} case(s) were computed with another teacher checkpoint than '{teacher_checkpoint}'")
        elif teacher_checkpoint is not None:
            logger.warning(f"teacher checkpoint '{teacher_checkpoint}' not found: cannot verify that the cached targets are its own.")
        if preprocessing is not None:
            wanted = _plain(dict(preprocessing))
            stale = [c for c in expected if self.manifest[c].get("preprocessing") != wanted]
            if stale:
                problems.append(f"{len(stale)} case(s) were computed with other pre-processing settings than {wanted}")
        if problems:
            raise ValueError(
                f"stale teacher cache '{self.cache_dir}': " + "; ".join(problems)
                + ". Rerun the cache step (configs/cache_teacher.json): it recomputes exactly those cases."
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case_id = d.get(self.case_key)
        entry = self.manifest.get(case_id)
        if entry is None:
            raise KeyError(f"case {case_id!r} is not in the teacher cache '{self.cache_dir}'; rerun the cache step.")
        targets = torch.load(self.cache_dir / entry["file"], map_location="cpu", weights_only=True)
        for key in self.keys:
            if key not in targets:
                raise KeyError(f"the cached targets of case {case_id!r} have no {key!r} (found {sorted(targets)}).")
            d[key] = targets[key].float()
        if self.image_key is not None and TARGET_KEYS[0] in self.keys and self.image_key in d:
            image_shape = tuple(d[self.image_key].shape[1:])
            if tuple(d[TARGET_KEYS[0]].shape[1:]) != image_shape:
                raise ValueError(
                    f"case {case_id!r}: cached teacher logits have spatial shape {tuple(d[TARGET_KEYS[0]].shape[1:])} but "
                    f"{self.image_key!r} has {image_shape}; the cache was built with other sizes: rerun the cache step."
                )
        return d
