"""Pseudo-labelling of unlabeled scans with the ensemble (Lachinov et al., section 4): the parts
MONAI does not ship. ``configs/pseudo_label.json`` wires them around MONAI's ``EnsembleEvaluator``.

* :func:`check_output_paths` — refuses an output folder that is the data folder, lies inside it or
  contains it, and a combined datalist that would overwrite the input datalist or land in the data.
* :func:`pending_cases` — drops the cases whose output already exists and validates, *before*
  inference, so a rerun never segments a case twice.
* :class:`SaveConfidenced` — writes each case's confidence (:func:`mean_confidence`) to a sidecar.
* :class:`SaveSoftLabeld` — writes the averaged probabilities instead of a label map.
* :func:`write_combined_datalist` — the new datalist: manual + pseudo-labelled training entries.

Files in ``pseudo_label_dir`` (every one written atomically: temporary file, then ``os.replace``):

``<case_id>.nii.gz``
    hard labels (default): BraTS label map 0/1/2/4, uint8, 3-D; soft labels: the ensemble's TC, WT,
    ET probabilities as a 4-D image (x, y, z, 3) stored as uint16 with ``scl_slope = 1/65535``
    (16 bits per value like float16, which NIfTI cannot store; readers apply the slope and get
    floats in [0, 1], quantisation error <= 7.7e-6). Always in the case's original geometry and affine.
``<case_id>.json``
    sidecar ``{"case_id", "label_format", "confidence", "foreground_voxels", "shape"}``, written
    *before* the image, so every image on disk has its sidecar.

Confidence of a case (:func:`mean_confidence`): the mean of ``max(p, 1 - p)`` over the three region
channels and over the voxels predicted as tumour (any region with ``p >= 0.5``); a case with no
predicted tumour gets 0 (every BraTS scan has a tumour, so an empty ensemble output is a failure).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .io import write_json_atomic
from .labels import SaveCaseImaged

__all__ = [
    "BRATS_LABELS",
    "LABEL_FORMATS",
    "SaveConfidenced",
    "SaveSoftLabeld",
    "check_output_paths",
    "mean_confidence",
    "output_problem",
    "pending_cases",
    "write_combined_datalist",
]

logger = logging.getLogger(__name__)

MODALITY_KEYS = ("t1", "t1ce", "t2", "flair")
PATH_KEYS = MODALITY_KEYS + ("label",)
BRATS_LABELS = (0, 1, 2, 4)
# "labels": one channel of label values (mapped per entry with its label_map);
# "probabilities": three channels TC, WT, ET in [0, 1].
LABEL_FORMATS = ("labels", "probabilities")
# Pseudo labels are written in BraTS values: their per-entry map is the identity.
BRATS_IDENTITY_MAP = {"orig": [1, 2, 4], "target": [1, 2, 4]}
SOFT_SCALE = 65535


# ------------------------------------------------------------------------------ output guard


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def data_folders(datalist_json: Mapping) -> list[Path]:
    """The dataset folder and every folder holding a file the datalist's entries point at."""
    dataset_dir = str(datalist_json.get("dataset_dir", ""))
    folders = {_real(dataset_dir)} if dataset_dir else set()
    for key in ("training", "unlabeled", "validation", "testing"):
        for entry in datalist_json.get(key, []) or []:
            if isinstance(entry, Mapping) and entry.get("source", "manual") == "manual":
                for k in PATH_KEYS:
                    if isinstance(entry.get(k), str):
                        folders.add(_real(os.path.join(dataset_dir, entry[k])).parent)
    return sorted(folders)


def check_output_paths(
    pseudo_label_dir: str, combined_datalist: str, input_datalist: str, datalist_json: Mapping
) -> None:
    """Raise ``ValueError`` (before anything is written) if the outputs could touch the source data.

    Refused: ``pseudo_label_dir`` equal to, inside, or containing the dataset folder or any folder
    holding a data file of the datalist; ``combined_datalist`` equal to the input datalist, inside
    one of those folders, or an existing folder.
    """
    if not str(pseudo_label_dir).strip():
        raise ValueError("pseudo_label_dir is empty: set the folder the pseudo labels go to.")
    out_dir = _real(pseudo_label_dir)
    for folder in data_folders(datalist_json):
        if out_dir == folder:
            relation = "is"
        elif out_dir.is_relative_to(folder):
            relation = "is inside"
        elif folder.is_relative_to(out_dir):
            relation = "contains"
        else:
            continue
        raise ValueError(
            f"pseudo_label_dir {out_dir} {relation} the data folder {folder}: refusing to write pseudo "
            "labels there (the source data must stay untouched); choose a folder outside the dataset."
        )
    combined = _real(combined_datalist)
    if input_datalist and combined == _real(input_datalist):
        raise ValueError(
            f"combined_datalist {combined} is the input datalist: refusing to overwrite it; choose a new path."
        )
    if combined.is_dir():
        raise ValueError(f"combined_datalist {combined} is a folder; give the path of the JSON file to write.")
    for folder in data_folders(datalist_json):
        if combined.is_relative_to(folder):
            raise ValueError(
                f"combined_datalist {combined} is inside the data folder {folder}: refusing to write there."
            )


# ------------------------------------------------------------------------------ confidence


def mean_confidence(probs: torch.Tensor | np.ndarray, threshold: float = 0.5) -> tuple[float, int]:
    """Confidence of one case from its region probabilities ``[3, *spatial]`` (TC, WT, ET).

    Returns ``(confidence, foreground_voxels)``: the mean of ``max(p, 1 - p)`` over the channels
    and the voxels where any channel has ``p >= threshold``; ``(0.0, 0)`` without such voxels.
    """
    p = torch.as_tensor(probs).detach().float()
    foreground = (p >= threshold).any(dim=0)
    count = int(foreground.sum())
    if count == 0:
        return 0.0, 0
    certainty = torch.maximum(p, 1.0 - p)[:, foreground]
    return float(certainty.mean()), count


def _label_format(soft: bool) -> str:
    return "probabilities" if soft else "labels"


def _sidecar(output_dir: str | os.PathLike, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}.json"


def _label_file(output_dir: str | os.PathLike, case_id: str) -> Path:
    return Path(output_dir) / f"{case_id}.nii.gz"


class SaveConfidenced(MapTransform):
    """Write ``<output_dir>/<case_id>.json`` with the case's :func:`mean_confidence` (atomically).

    ``keys``: the averaged region probabilities ``[3, *spatial]``. Put it before the label writer:
    a label file on disk then always has its sidecar.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        soft: bool = False,
        threshold: float = 0.5,
        case_id_key: str = "case_id",
    ) -> None:
        super().__init__(keys)
        self.output_dir = output_dir
        self.label_format = _label_format(soft)
        self.threshold = threshold
        self.case_id_key = case_id_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            confidence, count = mean_confidence(d[key], self.threshold)
            case_id = d[self.case_id_key]
            record = {
                "case_id": case_id,
                "label_format": self.label_format,
                "confidence": confidence,
                "foreground_voxels": count,
                "shape": [int(s) for s in d[key].shape[1:]],
            }
            write_json_atomic(_sidecar(self.output_dir, case_id), record)
            logger.info(f"{case_id}: confidence {confidence:.4f} ({count} predicted tumour voxels)")
        return d


class SaveSoftLabeld(SaveCaseImaged):
    """Save region probabilities ``[3, *spatial]`` as ``<output_dir>/<case_id>.nii.gz`` (atomically):
    a 4-D NIfTI ``(x, y, z, 3)``, uint16 with ``scl_slope = 1/65535``, affine from the tensor's metadata
    (so the probabilities must already be in the case's original geometry)."""

    def image(self, tensor: torch.Tensor) -> nib.Nifti1Image:
        if tensor.shape[0] != 3:
            raise ValueError(f"expected 3 region channels (TC, WT, ET), got shape {tuple(tensor.shape)}.")
        array = np.moveaxis(np.asarray(tensor.detach().cpu(), dtype=np.float32), 0, -1)
        quantised = np.round(np.clip(array, 0.0, 1.0) * SOFT_SCALE).astype(np.uint16)
        image = nib.Nifti1Image(quantised, np.asarray(tensor.affine, dtype=np.float64))
        image.header.set_slope_inter(1.0 / SOFT_SCALE, 0.0)
        return image


# ------------------------------------------------------------------------------ skip finished cases


def output_problem(case_id: str, reference_image: str, output_dir: str, soft: bool) -> str | None:
    """Why the case's existing output cannot be reused (``None``: it is complete and valid).

    Valid: the sidecar parses, names the case and the requested label format; the image loads, has
    the reference image's spatial shape and affine, and holds BraTS values 0/1/2/4 as uint8 (hard)
    or three channels of probabilities in [0, 1] (soft).
    """
    label_path, sidecar_path = _label_file(output_dir, case_id), _sidecar(output_dir, case_id)
    if not label_path.exists():
        return "no output yet"
    try:
        record = json.loads(sidecar_path.read_text(encoding="utf-8"))
        confidence = float(record["confidence"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"sidecar {sidecar_path.name} missing or unreadable ({e})"
    if record.get("case_id") != case_id:
        return f"sidecar names case {record.get('case_id')!r}"
    if record.get("label_format") != _label_format(soft):
        return f"stored as {record.get('label_format')!r}, {_label_format(soft)!r} requested"
    if not 0.0 <= confidence <= 1.0:
        return f"invalid confidence {confidence}"
    try:
        image = nib.load(str(label_path))
        reference = nib.load(str(reference_image))
        shape, ref_shape = tuple(image.shape), tuple(reference.shape[:3])
        expected = ref_shape + ((3,) if soft else ())
        if shape != expected:
            return f"shape {shape}, expected {expected}"
        if not np.allclose(image.affine, reference.affine, atol=1e-4):
            return "affine differs from the case's images"
        if soft:
            values = np.asanyarray(image.dataobj, dtype=np.float32)
            if not (np.all(values >= 0.0) and np.all(values <= 1.0)):
                return "probabilities outside [0, 1]"
        else:
            if image.get_data_dtype() != np.uint8:
                return f"dtype {image.get_data_dtype()}, expected uint8"
            extra = set(np.unique(np.asarray(image.dataobj)).tolist()) - set(BRATS_LABELS)
            if extra:
                return f"label values {sorted(extra)} outside 0/1/2/4"
    except Exception as e:  # noqa: BLE001 - any unreadable file means "redo"
        return f"cannot be read ({type(e).__name__}: {e})"
    return None


def pending_cases(cases: Sequence[Mapping], output_dir: str, soft: bool = False) -> list[Mapping]:
    """The cases still to pseudo-label: those without a valid output in ``output_dir``.

    ``cases``: inference items ``{"case_id", "image": [paths...]}`` (the first image is the geometry
    reference). Finished cases are logged as skipped; invalid outputs are logged and redone.
    """
    pending, skipped = [], []
    for case in cases:
        images = case["image"] if isinstance(case["image"], (list, tuple)) else [case["image"]]
        problem = output_problem(case["case_id"], images[0], output_dir, soft)
        if problem is None:
            skipped.append(case["case_id"])
            continue
        if problem != "no output yet":
            logger.warning(f"{case['case_id']}: existing output is not reusable ({problem}); redoing it")
        pending.append(case)
    if skipped:
        logger.info(f"skipped {len(skipped)} case(s) already pseudo-labelled in {output_dir}: {', '.join(skipped)}")
    logger.info(f"{len(pending)} case(s) to pseudo-label")
    return pending


# ------------------------------------------------------------------------------ combined datalist


def _reference_image(entry: Mapping, dataset_dir: str) -> str:
    for key in MODALITY_KEYS:
        if isinstance(entry.get(key), str):
            return os.path.join(dataset_dir, entry[key])
    raise ValueError(f"datalist entry {entry.get('case_id')!r} has no image path ({', '.join(MODALITY_KEYS)}).")


def write_combined_datalist(
    datalist_json: Mapping,
    output_dir: str,
    out_path: str,
    soft: bool = False,
    min_confidence: float = 0.0,
    data_list_key: str = "unlabeled",
    info: Mapping | None = None,
) -> dict:
    """Write (atomically) and return the datalist the omni-student trains on.

    ``training`` holds the input's manual entries (``"source": "manual"``, their ``fold`` and the
    dataset's ``label_map``) followed by one entry per pseudo-labelled case of ``data_list_key``
    (``"source": "pseudo"``, ``"fold": -1``, the identity ``label_map`` because pseudo labels are
    BraTS 0/1/2/4, ``label_format`` ``"labels"`` or ``"probabilities"``, ``confidence``). Image paths
    stay relative to ``dataset_dir``; pseudo ``label`` paths are absolute (``os.path.join`` of
    ``dataset_dir`` and an absolute path is that path, so one resolver serves both). Cases whose
    confidence is below ``min_confidence`` are left out and listed under ``dropped``. Every other
    top-level key of the input (layout, label_map, channel_index, dataset_dir, ...) is kept.
    """
    if isinstance(min_confidence, bool) or not math.isfinite(float(min_confidence)):
        raise ValueError(f"min_confidence must be a finite number, got {min_confidence!r}.")
    min_confidence = float(min_confidence)
    dataset_dir = str(datalist_json.get("dataset_dir", ""))
    dataset_map = datalist_json.get("label_map", BRATS_IDENTITY_MAP)
    manual = []
    for entry in datalist_json.get("training", []):
        if entry.get("source", "manual") != "manual":
            continue  # an earlier combined datalist as input: never stack pseudo entries twice
        manual.append(
            {**entry, "source": "manual", "label_map": entry.get("label_map", dataset_map), "label_format": "labels"}
        )
    pseudo, dropped = [], []
    for entry in datalist_json.get(data_list_key, []):
        case_id = entry["case_id"]
        problem = output_problem(case_id, _reference_image(entry, dataset_dir), output_dir, soft)
        if problem is not None:
            raise RuntimeError(f"{case_id}: no valid pseudo label in {output_dir} ({problem}); rerun pseudo-labelling.")
        confidence = float(json.loads(_sidecar(output_dir, case_id).read_text(encoding="utf-8"))["confidence"])
        if confidence < min_confidence:
            dropped.append({"case_id": case_id, "confidence": confidence})
            continue
        paths = {k: entry[k] for k in MODALITY_KEYS if k in entry}
        pseudo.append(
            {
                "case_id": case_id,
                **paths,
                "label": str(_real(_label_file(output_dir, case_id))),
                "fold": -1,
                "source": "pseudo",
                "label_map": dict(BRATS_IDENTITY_MAP),
                "label_format": _label_format(soft),
                "confidence": confidence,
            }
        )
    if dropped:
        listing = ", ".join(f"{d['case_id']} ({d['confidence']:.4f})" for d in dropped)
        logger.warning(f"dropped {len(dropped)} case(s) with confidence below {min_confidence}: {listing}")
    combined = {key: value for key, value in datalist_json.items() if key not in ("training", "dropped")}
    combined["training"] = manual + pseudo
    combined["dropped"] = dropped
    combined["pseudo_label"] = {
        "label_dir": str(_real(output_dir)),
        "label_format": _label_format(soft),
        "min_confidence": min_confidence,
        "confidence": "mean of max(p, 1-p) over the TC/WT/ET channels and the predicted tumour voxels (0 if none)",
        **dict(info or {}),
    }
    write_json_atomic(out_path, combined)
    logger.info(
        f"wrote {out_path}: {len(manual)} manual + {len(pseudo)} pseudo-labelled training entries, {len(dropped)} dropped"
    )
    return combined
