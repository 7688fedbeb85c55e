"""Code this bundle needs beyond MONAI: per-entry label conventions (manual + pseudo labels),
BraTS conventions and resumable training (the last two byte-identical to the teacher's)."""

from . import brats, labels, reliability
