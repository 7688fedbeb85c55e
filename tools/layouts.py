"""On-disk layouts of the public BraTS releases and the MSD brain-tumour task.

Each layout knows how to recognise a dataset folder, how to enumerate its cases (without
reading any voxel) and which label values its segmentations may contain. Supported:

``brats2018``  BraTS 2018-2020: ``{HGG,LGG}/Brats18_<inst>_<id>_1/Brats18_<inst>_<id>_1_<mod>.nii.gz``
               (also ``BraTS19_``/``BraTS20_`` prefixes and the flat 2020 naming
               ``BraTS20_Training_001/BraTS20_Training_001_<mod>.nii.gz``); labels {0,1,2,4}.
``brats2021``  ``BraTS2021_00000/BraTS2021_00000_<mod>.nii.gz``; labels {0,1,2,4}.
``brats2023``  ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-<t1n|t1c|t2w|t2f|seg>.nii.gz``; labels {0,1,2,3}.
``msd``        Task01_BrainTumour: ``imagesTr/*.nii.gz`` (4-D, channels FLAIR, T1w, T1gd, T2w),
               ``labelsTr/*.nii.gz``, ``imagesTs/*.nii.gz`` (unlabeled); labels {0,1,2,3}.

A case folder without a segmentation file is an unlabeled case. Paths are kept relative to
the dataset folder so a datalist stays valid when the dataset is moved or mounted elsewhere.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MODALITIES = ("t1", "t1ce", "t2", "flair")
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class LayoutError(Exception):
    """The dataset folder cannot be mapped onto a supported layout."""


@dataclass(frozen=True)
class Case:
    """One case as found on disk; nothing here has been read or checked yet.

    ``images`` maps each modality to a path relative to the dataset folder (for MSD all four
    point at the same 4-D file). ``label`` is None for an unlabeled case. ``group`` is the
    stratum for fold assignment (HGG/LGG in BraTS 2018-2020), None when unknown.
    ``stray_files`` lists NIfTI files in the case folder that match no expected name.
    """

    case_id: str
    images: dict[str, str]
    label: str | None
    group: str | None = None
    stray_files: tuple[str, ...] = ()

    def referenced_files(self) -> list[str]:
        """Distinct relative paths this case's datalist entry would point at."""
        paths = list(dict.fromkeys(self.images.values()))
        return paths + ([self.label] if self.label else [])


@dataclass(frozen=True)
class Layout:
    """A dataset layout: how to recognise it, list its cases, and interpret its labels."""

    name: str
    description: str
    label_values: frozenset[int]
    label_map: dict[str, list[int]]
    channel_index: dict[str, int]
    multichannel: bool  # True: one 4-D file holds all modalities (MSD)
    looks_like: Callable[[Path], bool] = field(repr=False)
    discover: Callable[[Path], list[Case]] = field(repr=False)


# ---------------------------------------------------------------------------------------------
# helpers shared by the layouts


def _visible_entries(folder: Path) -> list[Path]:
    """Entries of ``folder`` sorted by name, without hidden files and macOS ``._*`` forks."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _nifti_stem(name: str) -> str | None:
    """File name without its NIfTI extension, or None if it is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _find_nifti(folder: Path, stem: str) -> Path | None:
    """``folder/stem.nii.gz`` or ``folder/stem.nii``, whichever exists (gz preferred)."""
    for suffix in NIFTI_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _relative(path: Path, root: Path) -> str:
    """POSIX path of ``path`` relative to ``root``: the form stored in the datalist."""
    return path.relative_to(root).as_posix()


# ---------------------------------------------------------------------------------------------
# layouts with one folder per case and one file per modality (BraTS 2018-2023)


@dataclass(frozen=True)
class _FolderNaming:
    """Naming scheme of a one-folder-per-case layout."""

    case_pattern: re.Pattern
    separator: str  # between case id and file suffix: "_" (2018-2021) or "-" (2023)
    suffixes: dict[str, str]  # modality -> file suffix
    seg_suffix: str = "seg"


def _case_from_folder(folder: Path, root: Path, naming: _FolderNaming, group: str | None) -> Case:
    """Build a Case from a case folder; a modality file that is absent keeps its expected path."""
    case_id = folder.name
    images = {}
    for modality, suffix in naming.suffixes.items():
        stem = f"{case_id}{naming.separator}{suffix}"
        found = _find_nifti(folder, stem)
        # An absent file keeps its expected .nii.gz path so validation can name it.
        images[modality] = _relative(found or folder / f"{stem}.nii.gz", root)
    seg = _find_nifti(folder, f"{case_id}{naming.separator}{naming.seg_suffix}")
    expected_stems = {f"{case_id}{naming.separator}{s}" for s in (*naming.suffixes.values(), naming.seg_suffix)}
    stray = tuple(
        p.name for p in _visible_entries(folder) if _nifti_stem(p.name) not in (None, *expected_stems)
    )
    return Case(case_id, images, _relative(seg, root) if seg else None, group, stray)


def _case_folders(root: Path, pattern: re.Pattern) -> list[Path]:
    """Sub-folders of ``root`` whose name matches ``pattern``."""
    return [p for p in _visible_entries(root) if p.is_dir() and pattern.match(p.name)]


# BraTS 2018-2020 ------------------------------------------------------------------------------

_BRATS2018 = _FolderNaming(
    # Brats18_2013_10_1, BraTS19_CBICA_AAB_1, BraTS20_Training_001, ... (not BraTS2021_*)
    case_pattern=re.compile(r"^brats(18|19|20)_\w+$", re.IGNORECASE),
    separator="_",
    suffixes={"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
)
_GRADES = ("HGG", "LGG")


def _grades_from_name_mapping(root: Path) -> dict[str, str]:
    """Case id -> grade from BraTS 2020's ``name_mapping.csv``, which replaced the HGG/LGG folders.

    Returns an empty mapping when the file is absent or lacks the expected columns, in which
    case the folds are simply not stratified.
    """
    path = root / "name_mapping.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    grades = {}
    for row in rows:
        case_id, grade = row.get("BraTS_2020_subject_ID"), row.get("Grade")
        if case_id and grade in _GRADES:
            grades[case_id.strip()] = grade
    return grades


def _looks_like_brats2018(root: Path) -> bool:
    return any((root / g).is_dir() for g in _GRADES) or bool(_case_folders(root, _BRATS2018.case_pattern))


def _discover_brats2018(root: Path) -> list[Case]:
    cases = []
    for grade in _GRADES:
        if (root / grade).is_dir():
            for folder in _case_folders(root / grade, _BRATS2018.case_pattern):
                cases.append(_case_from_folder(folder, root, _BRATS2018, grade))
    # Flat layout (BraTS 2019 validation, BraTS 2020): the grade, if known, comes from the CSV.
    grades = _grades_from_name_mapping(root)
    for folder in _case_folders(root, _BRATS2018.case_pattern):
        cases.append(_case_from_folder(folder, root, _BRATS2018, grades.get(folder.name)))
    return cases


# BraTS 2021 ----------------------------------------------------------------------------------

_BRATS2021 = _FolderNaming(
    case_pattern=re.compile(r"^BraTS2021_\d{5}$"),
    separator="_",
    suffixes={"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"},
)


def _looks_like_brats2021(root: Path) -> bool:
    return bool(_case_folders(root, _BRATS2021.case_pattern))


def _discover_brats2021(root: Path) -> list[Case]:
    return [_case_from_folder(f, root, _BRATS2021, None) for f in _case_folders(root, _BRATS2021.case_pattern)]


# BraTS 2023 GLI ------------------------------------------------------------------------------

_BRATS2023 = _FolderNaming(
    case_pattern=re.compile(r"^BraTS-GLI-\d{5}-\d{3}$"),
    separator="-",
    # 2023 renamed the sequences: t1n = native T1, t1c = contrast T1, t2w = T2, t2f = FLAIR.
    suffixes={"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"},
)


def _looks_like_brats2023(root: Path) -> bool:
    return bool(_case_folders(root, _BRATS2023.case_pattern))


def _discover_brats2023(root: Path) -> list[Case]:
    return [_case_from_folder(f, root, _BRATS2023, None) for f in _case_folders(root, _BRATS2023.case_pattern)]


# MSD Task01_BrainTumour ------------------------------------------------------------------------

_MSD_FOLDERS = ("imagesTr", "labelsTr", "imagesTs")
# Channel order of the 4-D images, as documented in the task's dataset.json.
_MSD_CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
_MSD_MODALITY_NAMES = ["flair", "t1w", "t1gd", "t2w"]


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Case id (file stem) -> path for the NIfTI files of an MSD folder; {} if it is absent."""
    if not folder.is_dir():
        return {}
    files = {}
    for path in _visible_entries(folder):
        stem = _nifti_stem(path.name)
        if stem is not None and path.is_file():
            files[stem] = path
    return files


def _check_msd_channel_order(root: Path) -> None:
    """Refuse a dataset.json whose modality list contradicts the channel order assumed here.

    The file is optional; when present it is the authority on what each channel holds, and a
    silent mismatch would feed e.g. T2 to a network as T1ce.
    """
    path = root / "dataset.json"
    if not path.is_file():
        return
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LayoutError(f"{path} is not valid JSON ({err})") from None
    modality = content.get("modality") if isinstance(content, dict) else None
    if modality is None:
        return
    if not isinstance(modality, dict):
        raise LayoutError(f"{path}: 'modality' should map channel numbers to names, got {modality!r}")
    names = [str(modality.get(str(i), "")).lower() for i in range(len(modality))]
    if names != _MSD_MODALITY_NAMES:
        raise LayoutError(
            f"{path}: modality channels are {names}, expected {_MSD_MODALITY_NAMES} "
            "(FLAIR, T1w, T1gd, T2w)"
        )


def _looks_like_msd(root: Path) -> bool:
    return any((root / name).is_dir() for name in _MSD_FOLDERS)


def _msd_case(case_id: str, image: Path, label: str | None, root: Path) -> Case:
    rel = _relative(image, root)
    return Case(case_id, {m: rel for m in MODALITIES}, label)


def _discover_msd(root: Path) -> list[Case]:
    _check_msd_channel_order(root)
    images, labels = _nifti_files(root / "imagesTr"), _nifti_files(root / "labelsTr")
    cases = []
    for case_id in sorted(images.keys() | labels.keys()):
        # imagesTr promises a label for every image: an image without one (or a label without
        # its image) keeps the expected path of the absent file so validation reports it.
        image = images.get(case_id, root / "imagesTr" / f"{case_id}.nii.gz")
        label = labels.get(case_id, root / "labelsTr" / f"{case_id}.nii.gz")
        cases.append(_msd_case(case_id, image, _relative(label, root), root))
    for case_id, image in sorted(_nifti_files(root / "imagesTs").items()):
        cases.append(_msd_case(case_id, image, None, root))
    return cases


# ---------------------------------------------------------------------------------------------
# registry and detection

_BRATS_LABEL_MAP = {"orig": [1, 2, 4], "target": [1, 2, 4]}
_PER_FILE_CHANNELS = {m: 0 for m in MODALITIES}

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "brats2018", "BraTS 2018-2020 ({HGG,LGG}/Brats18_*, BraTS19_*, BraTS20_*)",
            frozenset({0, 1, 2, 4}), _BRATS_LABEL_MAP, _PER_FILE_CHANNELS, False,
            _looks_like_brats2018, _discover_brats2018,
        ),
        Layout(
            "brats2021", "BraTS 2021 (BraTS2021_00000/)",
            frozenset({0, 1, 2, 4}), _BRATS_LABEL_MAP, _PER_FILE_CHANNELS, False,
            _looks_like_brats2021, _discover_brats2021,
        ),
        Layout(
            "brats2023", "BraTS 2023 GLI (BraTS-GLI-00000-000/)",
            # 2023 renumbered enhancing tumour 4 -> 3.
            frozenset({0, 1, 2, 3}), {"orig": [1, 2, 3], "target": [1, 2, 4]}, _PER_FILE_CHANNELS, False,
            _looks_like_brats2023, _discover_brats2023,
        ),
        Layout(
            "msd", "MSD Task01_BrainTumour (imagesTr/, labelsTr/, imagesTs/)",
            # MSD: 1 edema, 2 non-enhancing, 3 enhancing -> BraTS 2 edema, 1 NCR/NET, 4 ET.
            frozenset({0, 1, 2, 3}), {"orig": [1, 2, 3], "target": [2, 1, 4]}, _MSD_CHANNELS, True,
            _looks_like_msd, _discover_msd,
        ),
    )
}


def detect_layout(root: Path) -> Layout:
    """The single layout ``root`` looks like; LayoutError if it matches none or several."""
    matches = [layout for layout in LAYOUTS.values() if layout.looks_like(root)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(m.name for m in matches)
        raise LayoutError(f"{root} is ambiguous: it looks like each of {names}; pass --layout to choose")
    raise LayoutError(_unknown_layout_message(root))


def _unknown_layout_message(root: Path) -> str:
    """Explain why no layout matched, hinting at a wrapper folder (a common unzip artefact)."""
    entries = _visible_entries(root)
    if not entries:
        return f"no cases found: {root} is empty"
    message = f"cannot recognise the layout of {root}; expected one of: " + "; ".join(
        layout.description for layout in LAYOUTS.values()
    )
    subfolders = [p for p in entries if p.is_dir()]
    if len(subfolders) == 1 and any(layout.looks_like(subfolders[0]) for layout in LAYOUTS.values()):
        message += f" (did you mean --data {subfolders[0]}?)"
    else:
        shown = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
        message += f" (found: {shown})"
    return message


def discover_cases(root: Path, layout: Layout) -> list[Case]:
    """All cases of ``root`` under ``layout``, sorted by case id; LayoutError on duplicate ids."""
    cases = sorted(layout.discover(root), key=lambda c: c.case_id)
    seen: dict[str, Case] = {}
    for case in cases:
        if case.case_id in seen:
            raise LayoutError(
                f"case id {case.case_id} occurs twice ({seen[case.case_id].images['t1']} "
                f"and {case.images['t1']})"
            )
        seen[case.case_id] = case
    return cases
