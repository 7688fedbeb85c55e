"""Datalist, fold and flag logic the bundle configs call in one line each.

These were Python expressions inside JSON strings (four copies of the path resolver, seven of the
flag parser, eight of the MSD channel lambda), where no test or debugger could reach them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "as_flag",
    "by_source",
    "channel_selector",
    "fold_split",
    "folder_cases",
    "image_cases",
    "modality_selector",
    "one_file_per_case",
    "resolve_paths",
    "test_fold",
]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "none", "")


def as_flag(value: Any) -> bool:
    """A boolean config value that may arrive from the command line as a string.

    ``monai.bundle run --resume false`` passes the string ``'false'`` (Fire parses only Python
    literals), which is truthy: read it as a flag instead. An unrecognised word is an error rather
    than a silent ``False``.
    """
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected a boolean flag ({'/'.join(_TRUE)} or {'/'.join(_FALSE[:-2])}), got {value!r}.")


def resolve_paths(
    cases: Sequence[Mapping],
    dataset_dir: str,
    path_keys: Sequence[str],
    defaults: Mapping | None = None,
    keep: Sequence[str] | None = None,
) -> list[dict]:
    """Copies of ``cases`` with every ``path_keys`` entry joined to ``dataset_dir``.

    ``defaults`` fills keys a case lacks (e.g. the omni-student's per-entry ``label_map`` and
    ``label_format``); the case's own values win. With ``keep``, only the path keys and the keys in
    ``keep`` are returned, so that entries of different origins (manual, pseudo) collate in one batch.
    """
    keys = set(path_keys)
    out = []
    for case in cases:
        entry = {**(defaults or {}), **case}
        if keep is not None:
            entry = {k: v for k, v in entry.items() if k in keys or k in keep}
        out.append({k: os.path.join(dataset_dir, v) if k in keys else v for k, v in entry.items()})
    return out


def by_source(cases: Sequence[Mapping], source: str) -> list[Mapping]:
    """The entries of a combined datalist from ``source`` (``"manual"`` or ``"pseudo"``; an entry
    without a ``source`` is manual, so a plain ``tools.prepare`` datalist is all manual)."""
    return [c for c in cases if c.get("source", "manual") == source]


def fold_split(cases: Sequence[Mapping], fold: int, val_stride: int) -> dict[str, list[Mapping]]:
    """Training and validation cases for test fold ``fold``.

    The cases outside the test fold form the training pool, in datalist order; every
    ``val_stride``-th of them (the 0th, the ``val_stride``-th, ...) validates (checkpoint
    selection), the rest train. Returns ``{"train": [...], "val": [...]}``.
    """
    if int(val_stride) < 1:
        raise ValueError(f"val_stride must be >= 1, got {val_stride}.")
    pool = [c for c in cases if c["fold"] != fold]
    return {
        "train": [c for i, c in enumerate(pool) if i % val_stride != 0],
        "val": [c for i, c in enumerate(pool) if i % val_stride == 0],
    }


def test_fold(cases: Sequence[Mapping], fold: int) -> list[Mapping]:
    """The held-out cases of ``fold`` (evaluation)."""
    return [c for c in cases if c["fold"] == fold]


test_fold.__test__ = False  # a library function, not a pytest test


class _Channels:
    """Keep the given channels of a channel-first array (a class, not a lambda: picklable for workers)."""

    def __init__(self, indices: Sequence[int] | None) -> None:
        self.indices = None if indices is None else [int(i) for i in indices]

    def __call__(self, x):
        return x if self.indices is None else x[self.indices]

    def __repr__(self) -> str:
        return f"_Channels({self.indices})"


def one_file_per_case(channel_index: Mapping[str, int]) -> bool:
    """Whether the datalist's modalities are channels of one 4-D file (MSD): ``tools.prepare`` writes a
    ``channel_index`` for every layout, all zeros where each modality has its own file."""
    return len(set(channel_index.values())) > 1


def channel_selector(channel_index: Mapping[str, int], modality: str) -> Callable:
    """The transform function that keeps ``modality``'s channel of a loaded image.

    An MSD case stores the four modalities as channels of one 4-D file, and ``channel_index``
    (from the datalist) says which is which; BraTS layouts have one file per modality, so
    ``channel_index`` is empty and channel 0 is kept.
    """
    return _Channels([channel_index.get(modality, 0)])


def modality_selector(channel_index: Mapping[str, int], modalities: Sequence[str]) -> Callable:
    """The transform function that picks the model's ``modalities``, in order, from a loaded image:
    from one MSD 4-D file by ``channel_index``; the identity for a stack of per-modality files."""
    if not one_file_per_case(channel_index):
        return _Channels(None)
    return _Channels([channel_index[m] for m in modalities])


def image_cases(datalist_json: Mapping, data_list_key: str, modalities: Sequence[str]) -> list[dict]:
    """Inference cases ``{"case_id", "image": [files]}`` from a prepared datalist's ``data_list_key``.

    For MSD (``channel_index`` present) every modality is the same 4-D file, listed once.
    """
    dataset_dir = datalist_json.get("dataset_dir", "")
    msd = one_file_per_case(datalist_json.get("channel_index", {}))
    cases = []
    for case in datalist_json.get(data_list_key, []) or []:
        files = [os.path.join(dataset_dir, case[m]) for m in modalities]
        cases.append({"case_id": case["case_id"], "image": sorted(set(files)) if msd else files})
    return cases


def folder_cases(input_dir: str, modalities: Sequence[str]) -> list[dict]:
    """Inference cases from a folder of BraTS 2018–2021 case folders (``<case>/<case>_<modality>.nii.gz``)."""
    if not input_dir:
        return []
    cases = []
    for folder in sorted(glob.glob(os.path.join(input_dir, "*"))):
        if os.path.isdir(folder):
            name = os.path.basename(folder)
            cases.append({"case_id": name, "image": [os.path.join(folder, f"{name}_{m}.nii.gz") for m in modalities]})
    return cases
