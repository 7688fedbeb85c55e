"""The input modalities of a KD student: any non-empty subset of its teacher's.

KD-Net distils into a T1ce-only student; the missing-modality literature (RFNet, mmFormer, ProtoKD, ...)
asks the same question for every subset of T1, T1ce, T2 and FLAIR. The kd_student bundle's config value
``student_modalities`` (default ``["t1ce"]``) chooses the student's input channels, in order; the
configs call :func:`student_modalities` once, so a subset the teacher cannot teach is refused when
the network or the transforms are built, before any data is read.

A bundle's ``metadata.json`` cannot follow a config value (the zoo tools read it verbatim), so
:func:`metadata_overrides` gives the ``_meta_#...`` values describing a subset's input, and
``python -m brats_kd.modalities`` writes them as the ``--args_file`` of ``monai.bundle
verify_net_in_out`` / ``ckpt_export`` / ``onnx_export`` (the way ``configs/metadata_softmax.json``
describes the softmax head).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["CHANNEL_NAMES", "metadata_overrides", "student_modalities", "write_metadata_overrides"]

#: the names metadata.json's channel_def uses for each modality key of the datalists
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}


def _as_list(name: str, value) -> list:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list of modality names such as [\"t1ce\"], got {value!r}.")
    return list(value)


def student_modalities(student: Sequence[str], teacher: Sequence[str]) -> list[str]:
    """``student`` (the student's input channels, in order) after checking it against ``teacher``.

    Refused, with both lists named: an empty list, a modality listed twice, a name that is not a
    string, and a modality the teacher does not see (the teacher cannot teach the student about an
    image it never had; the baseline of that subset would be a different experiment).

    Returns:
        a new list, the student's channel order (channel ``i`` is ``student[i]``).
    """
    student, teacher = _as_list("student_modalities", student), _as_list("teacher_modalities", teacher)
    where = f"student_modalities {student!r}, teacher_modalities {teacher!r}"
    if not student:
        raise ValueError(f"student_modalities is empty ({where}): the student needs at least one input modality.")
    if not all(isinstance(m, str) and m for m in student):
        raise ValueError(f"student_modalities must hold modality names (non-empty strings) ({where}).")
    repeated = sorted({m for m in student if student.count(m) > 1})
    if repeated:
        raise ValueError(f"student_modalities lists {repeated} more than once ({where}): each modality is one channel.")
    unknown = [m for m in student if m not in teacher]
    if unknown:
        raise ValueError(
            f"student_modalities {unknown} not among the teacher's modalities ({where}): the student's input must be "
            "a subset of what the teacher sees."
        )
    return student


def metadata_overrides(modalities: Sequence[str]) -> dict:
    """The ``_meta_#...`` entries that make kd_student's metadata.json describe a student on ``modalities``:
    the input's ``num_channels`` and ``channel_def`` and the ``image_classes`` line."""
    modalities = _as_list("student_modalities", modalities)
    unknown = [m for m in modalities if m not in CHANNEL_NAMES]
    if not modalities or unknown:
        raise ValueError(f"student_modalities must be a non-empty list of {sorted(CHANNEL_NAMES)}, got {modalities!r}.")
    names = [CHANNEL_NAMES[m] for m in modalities]
    return {
        "_meta_#image_classes": (
            f"{len(names)} channel{'s' if len(names) > 1 else ''}: {', '.join(names)} (the `student_modalities` "
            "config value, in order), each z-scored on non-zero voxels"
        ),
        "_meta_#network_data_format#inputs#image#num_channels": len(names),
        "_meta_#network_data_format#inputs#image#channel_def": {str(i): n for i, n in enumerate(names)},
    }


def write_metadata_overrides(modalities: Sequence[str], out: str | Path, base: Sequence[str | Path] = ()) -> dict:
    """Write :func:`metadata_overrides` of ``modalities`` as JSON to ``out``, merged after the ``_meta_#``
    entries of each ``base`` file (e.g. ``configs/metadata_softmax.json`` for a softmax student); returns them."""
    merged: dict = {}
    for path in base:
        content = json.loads(Path(path).read_text())
        if not isinstance(content, Mapping):
            raise ValueError(f"{path}: expected a JSON object of _meta_# overrides.")
        merged.update({k: v for k, v in content.items() if k.startswith("_meta_#")})
    merged.update(metadata_overrides(modalities))
    Path(out).write_text(json.dumps(merged, indent=4) + "\n")
    return merged


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m brats_kd.modalities",
        description="Write the --args_file describing a kd_student trained on student_modalities, for monai.bundle "
        "verify_net_in_out / ckpt_export / onnx_export.",
    )
    parser.add_argument("modalities", help="the student's modalities, comma-separated, in the config's order (e.g. t1,t2)")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--base", action="append", default=[], help="a _meta_# override file to merge first (repeatable)")
    args = parser.parse_args(argv)
    write_metadata_overrides([m.strip() for m in args.modalities.split(",") if m.strip()], args.out, args.base)


if __name__ == "__main__":
    main()
