"""Files every bundle carries as its own copy (a zoo bundle ships as one self-contained folder) must
not drift apart: a fix made in one bundle has to reach all of them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.bundle_runner import BUNDLES

# file → bundles that must have it; every other bundle that has it must carry the same bytes
SHARED_CODE = {
    "scripts/network.py": {"teacher", "kd_student"},
    "scripts/brats.py": {"teacher", "kd_student"},
    "scripts/reliability.py": {"teacher", "kd_student"},
}
# files every bundle must have, identical everywhere
EVERY_BUNDLE = ("configs/logging.conf", "LICENSE")


def bundles() -> list[Path]:
    """Bundle folders: the directories under ``bundles/`` with configs or scripts."""
    return sorted(p for p in BUNDLES.iterdir() if p.is_dir() and ((p / "configs").is_dir() or (p / "scripts").is_dir()))


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


@pytest.mark.parametrize("relative", sorted(SHARED_CODE))
def test_shared_code_is_byte_identical_in_every_bundle_that_has_it(relative):
    copies = [b / relative for b in bundles() if (b / relative).is_file()]
    missing = SHARED_CODE[relative] - {bundle_of(p) for p in copies}
    assert not missing, f"{relative} is missing from {sorted(missing)}"
    assert_identical(relative, copies)


@pytest.mark.parametrize("relative", EVERY_BUNDLE)
def test_every_bundle_carries_the_same(relative):
    folders = bundles()
    missing = [b.name for b in folders if not (b / relative).is_file()]
    assert not missing, f"{relative} is missing from {missing}"
    assert_identical(relative, [b / relative for b in folders])
