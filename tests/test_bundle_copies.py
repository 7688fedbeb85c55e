"""Files every bundle carries as its own copy (logging.conf, LICENSE) must not drift apart; shared
code is not copied at all: it lives once, in the ``brats_kd`` package."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.bundle_runner import BUNDLES

# files every bundle must have, identical everywhere
EVERY_BUNDLE = ("configs/logging.conf", "LICENSE")


def bundles() -> list[Path]:
    """Bundle folders: the directories under ``bundles/`` with configs."""
    return sorted(p for p in BUNDLES.iterdir() if p.is_dir() and (p / "configs").is_dir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def bundle_of(path: Path) -> str:
    return path.relative_to(BUNDLES).parts[0]


def assert_identical(relative: str, copies: list[Path]) -> None:
    digests = {bundle_of(p): digest(p) for p in copies}
    assert len(set(digests.values())) == 1, (
        f"copies of {relative} differ between bundles (sha256 prefix per bundle): {digests}; "
        f"make them byte-identical again, e.g. copy the fixed one over the others"
    )


def test_the_known_bundles_are_found():
    names = {p.name for p in bundles()}
    assert {"teacher", "kd_student"} <= names


def test_no_bundle_carries_python_code():
    """Code more than one bundle uses lives in brats_kd; configs name its parts instead of copying it."""
    code = sorted(str(p.relative_to(BUNDLES)) for p in BUNDLES.rglob("*.py"))
    assert not code, f"Python files under bundles/: {code}; move shared code into brats_kd"


@pytest.mark.parametrize("relative", EVERY_BUNDLE)
def test_every_bundle_carries_the_same(relative):
    folders = bundles()
    missing = [b.name for b in folders if not (b / relative).is_file()]
    assert not missing, f"{relative} is missing from {missing}"
    assert_identical(relative, [b / relative for b in folders])
