"""Synthetic BraTS-like brain-tumour cases: the project's built-in data set.

No real BraTS data can be downloaded where this project is developed, so experiments and
tests run on phantoms that keep the property the knowledge-distillation premise depends on:
a single modality genuinely loses information (DESIGN.md section 4). Oedema is nearly
invisible on T1ce (it has the grey-matter signal there) but bright on T2/FLAIR, and the
enhancing rim stands out almost only on T1ce.

How one case is made (:func:`make_case`):

1. **Anatomy** in continuous millimetre coordinates: a deformed ellipsoidal brain, a folded
   grey-matter cortex with sulcal CSF and a thin CSF rim, white matter inside, deep grey
   nuclei, lateral and third ventricles and the interhemispheric fissure.
2. **Tumour** in one hemisphere: an irregular core (a perturbed ellipsoid plus satellite
   blobs) layered as necrotic centre, enhancing rim (patchy; absent in 36 % of low-grade cases, as in
   BraTS 2018) and non-enhancing tumour; oedema spreading irregularly through white matter around it, and a
   mass effect that pushes ventricles and midline away.
3. **Imaging**: per-tissue signal from :data:`CONTRAST` with mild texture, partial-volume
   blur, a smooth multiplicative bias field, per-case intensity scale and in-brain offset,
   Rician noise, and zero outside the brain (skull-stripped).

Random fields are drawn on a grid of nodes fixed in millimetres, so a case's anatomy and
tumour do not depend on ``size`` (only the sampling and the voxel noise do). Every case is
seeded from ``(seed, index)`` alone, so case ``i`` is the same whatever the data-set size.

Images are integer-valued and written as int16, as real BraTS scans are: that halves the
files, compresses better, and the array returned by :func:`make_case` equals the file
content exactly. Command line::

    python -m tools.phantom --out DIR --cases 40 --unlabeled 10 --size 96 --seed 0 --layout brats2021
"""

from __future__ import annotations

import gzip
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.sparse import csr_matrix
from scipy.spatial.transform import Rotation

from brats_kd.io import write_bytes_atomic

MODALITIES = ("t1", "t1ce", "t2", "flair")
LAYOUTS = ("brats2018", "brats2021", "brats2023", "msd")

# Tissue codes of PhantomCase.tissue (the ground truth behind the BraTS label).
BACKGROUND, CSF, GM, WM, EDEMA, NECROSIS, NON_ENHANCING, ENHANCING = range(8)
TISSUE_NAMES = ("background", "csf", "gm", "wm", "edema", "necrosis", "non_enhancing", "enhancing")

# Relative signal per tissue and modality (t1, t1ce, t2, flair), white matter = 1 (DESIGN.md §4).
CONTRAST = {
    CSF: (0.38, 0.38, 3.01, 0.07),
    GM: (0.85, 0.85, 1.41, 1.16),
    WM: (1.00, 1.00, 1.00, 1.00),
    EDEMA: (0.82, 0.82, 2.27, 1.66),
    NECROSIS: (0.57, 0.57, 2.91, 1.10),
    NON_ENHANCING: (0.75, 0.90, 1.77, 1.23),
    ENHANCING: (0.74, 1.67, 1.66, 1.15),
}

# BraTS 2018-2021 label of each tissue: 1 necrotic/non-enhancing core, 2 oedema, 4 enhancing.
BRATS_LABEL = {EDEMA: 2, NECROSIS: 1, NON_ENHANCING: 1, ENHANCING: 4}

# Field of view of a real BraTS volume (240 x 240 x 155 voxels of 1 mm); --size S samples the
# same field of view with S x S x round(S * 155 / 240) voxels of 240 / S mm.
FOV_MM = (240.0, 240.0, 155.0)

# Probability that a case is a high-grade glioma (BraTS 2018: 210 HGG, 75 LGG).
P_HGG = 0.75


class PhantomError(ValueError):
    """Invalid generator arguments or output folder; the message is meant for the user."""


@dataclass
class PhantomCase:
    """One synthetic case.

    ``images`` maps t1, t1ce, t2, flair to integer-valued float32 volumes (zero outside the
    brain); ``label`` holds BraTS 2018-2021 values 0/1/2/4; ``tissue`` the tissue codes above
    (it separates necrosis from non-enhancing tumour, which share label 1); ``grade`` is HGG or
    LGG; ``affine`` maps voxel indices to millimetres, LPS-oriented like BraTS.
    """

    index: int
    images: dict[str, np.ndarray]
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    grade: str

    @property
    def brain_mask(self) -> np.ndarray:
        """Voxels inside the (skull-stripped) brain."""
        return self.tissue != BACKGROUND


# ---------------------------------------------------------------------------------------------
# geometry


def volume_shape(size: int) -> tuple[int, int, int]:
    """Array shape for ``--size``: S x S x round(S * 155 / 240), the BraTS aspect ratio."""
    return (size, size, int(round(size * FOV_MM[2] / FOV_MM[0])))


def voxel_spacing(size: int) -> float:
    """Isotropic voxel size in mm (1 mm at size 240)."""
    return FOV_MM[0] / size


def brats_affine(size: int) -> np.ndarray:
    """BraTS-like affine: x and y axes flipped (LPS voxel order), volume centre at the origin."""
    spacing = voxel_spacing(size)
    shape = volume_shape(size)
    affine = np.diag([-spacing, -spacing, spacing, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return affine


class Grid:
    """World coordinates (mm, RAS+: x right, y anterior, z superior) of voxel centres, or a crop.

    The affine is diagonal, so the coordinates of a voxel grid are three 1-D axes.
    """

    def __init__(self, axes: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.axes = axes
        self.shape = tuple(len(a) for a in axes)

    @classmethod
    def for_size(cls, size: int) -> Grid:
        """The full volume of ``--size``, with the coordinates its affine assigns."""
        affine = brats_affine(size)
        shape = volume_shape(size)
        axes = tuple((affine[d, d] * np.arange(n) + affine[d, 3]).astype(np.float32) for d, n in enumerate(shape))
        return cls(axes)

    def crop(self, slices: tuple[slice, slice, slice]) -> Grid:
        """The sub-grid of a box of voxels (same coordinates, so random fields agree)."""
        return Grid(tuple(a[s] for a, s in zip(self.axes, slices)))

    def box_around(self, centre: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
        """Index slices of the voxels within ``radius_mm`` of ``centre`` along every axis."""
        slices = []
        for axis, c in zip(self.axes, centre):
            inside = np.flatnonzero(np.abs(axis - c) <= radius_mm)
            slices.append(slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0))
        return tuple(slices)

    def offsets(self, centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable x, y, z distances (mm) from ``centre``."""
        x, y, z = (a - np.float32(c) for a, c in zip(self.axes, centre))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _interpolation_matrix(axis: np.ndarray, nodes: np.ndarray, corr_mm: float) -> csr_matrix:
    """Sparse Gaussian-kernel weights from ``nodes`` to ``axis`` (rows of unit Euclidean norm).

    Only the nodes within 4 ``corr_mm`` of a sample are kept (a dropped weight is < 3e-4 of the
    largest), so each row has at most 9 entries.
    """
    rows, cols = np.nonzero(np.abs(axis[:, None] - nodes[None, :]) <= 4 * corr_mm)
    values = np.exp(-0.5 * ((axis[rows] - nodes[cols]) / corr_mm) ** 2)
    norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=len(axis)))
    return csr_matrix(((values / norms[rows]).astype(np.float32), (rows, cols)), shape=(len(axis), len(nodes)))


def smooth_field(rng: np.random.Generator, grid: Grid, corr_mm: float) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation length ``corr_mm``, sampled on ``grid``.

    White noise on nodes spaced ``corr_mm`` apart over the whole field of view (so the random
    draw does not depend on the grid's resolution or crop) is interpolated with a separable
    Gaussian kernel; normalising each axis' weights to unit norm makes the variance exactly one.
    The interpolation is three sparse matrix products (single-threaded C, no BLAS threads
    fighting over two cores) whose cost does not grow with the number of nodes.
    """
    margin = 5 * corr_mm  # nodes beyond the field of view, so no sample lacks neighbours
    node_axes = [np.arange(-(fov / 2 + margin), fov / 2 + margin + 1e-3, corr_mm, dtype=np.float32) for fov in FOV_MM]
    field = rng.standard_normal(tuple(len(n) for n in node_axes), dtype=np.float32)
    for axis, nodes in zip(grid.axes, node_axes):
        # Contract the leading axis and rotate it to the back: after three steps the order is x, y, z.
        weights = _interpolation_matrix(axis, nodes, corr_mm)
        rest = field.shape[1:]
        field = (weights @ field.reshape(len(nodes), -1)).reshape(len(axis), *rest)
        field = np.moveaxis(field, 0, -1)
    return np.ascontiguousarray(field)


def ellipsoid_radius(offsets, semi_axes, rotation: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoidal radius (1 on the surface) of points given as centre offsets."""
    x, y, z = offsets
    if rotation is not None:  # express the offsets in the ellipsoid's own axes
        r = rotation.T
        x, y, z = (r[i, 0] * x + r[i, 1] * y + r[i, 2] * z for i in range(3))
    a, b, c = semi_axes
    return np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)


# ---------------------------------------------------------------------------------------------
# anatomy


@dataclass
class Tumour:
    """Random parameters of one tumour (drawn before any voxel is touched)."""

    centre: np.ndarray  # mm
    side: float  # +1 right hemisphere, -1 left
    midline: float  # x (mm) of the brain's midline, which oedema does not cross
    semi_axes: np.ndarray  # mm, of the main core ellipsoid
    rotation: np.ndarray
    satellites: list  # (centre, radius) of extra blobs fused with the core
    shape_noise: float  # amplitude of the boundary perturbation (in normalised radius)
    necrosis_level: float  # normalised radius of the necrotic centre (0: none)
    enhancing_level: float  # outer normalised radius of the enhancing layer (0: no enhancement)
    enhancing_threshold: float  # threshold on a random field that makes the enhancement patchy
    edema_extent: float  # oedema reaches this normalised radius on average
    edema_noise: float  # amplitude of the random spread of the oedema margin
    mass_effect: float  # displacement of deep anatomy per mm of distance from the tumour centre

    @property
    def radius(self) -> float:
        """Radius (mm) of the sphere with the main core ellipsoid's volume."""
        return float(np.cbrt(np.prod(self.semi_axes)))


def draw_tumour(rng: np.random.Generator, grade: str, brain_centre, brain_axes) -> Tumour:
    """Tumour parameters: one hemisphere, well inside the brain, grade-dependent structure."""
    side = float(rng.choice([-1.0, 1.0]))
    a, b, c = brain_axes
    radius = float(np.exp(rng.uniform(np.log(12.0), np.log(28.0))))
    # Keep the centre at least 0.7 radii from the midline so the core stays in one hemisphere.
    lateral = max(0.25 * a, 0.7 * radius)
    while True:  # rejection-sample a centre in the hemisphere's white-matter zone
        offset = np.array(
            [side * rng.uniform(lateral, 0.6 * a), rng.uniform(-0.65, 0.65) * b, rng.uniform(-0.5, 0.55) * c]
        )
        if np.sum((offset / np.asarray(brain_axes)) ** 2) < 0.6**2:
            break
    semi_axes = radius * rng.uniform(0.75, 1.3, size=3)
    rotation = Rotation.random(random_state=rng).as_matrix()
    centre = np.asarray(brain_centre) + offset
    satellites = []  # smaller blobs fused to the main body, for lobulated shapes
    for _ in range(rng.choice([0, 1, 2], p=[0.45, 0.35, 0.2])):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        satellites.append((centre + direction * radius * rng.uniform(0.7, 1.1), radius * rng.uniform(0.3, 0.6)))
    high = grade == "HGG"
    has_necrosis = rng.random() < (0.85 if high else 0.2)
    # Cases without enhancing tumour as counted on the BraTS 2018 training labels: 0 of 210 HGG, 27 of 75 LGG
    # (a third-party count over all 285 cases: github.com/Heisenberg17J/reto-CIMAT, DECISIONES.md D1/D11, commit
    # bb09f37). Before commit c73dec9 the phantom used 8 % of HGG and 70 % of LGG, a third of all cases.
    has_enhancing = rng.random() < (1.0 if high else 1 - 27 / 75)
    necrosis = rng.uniform(0.35, 0.6) if has_necrosis else 0.0
    # High grade: an enhancing ring reaching close to the tumour margin; low grade: at most a
    # thin enhancing layer around a small necrosis, most of the core non-enhancing.
    if not has_enhancing:
        enhancing = 0.0
    elif high:
        enhancing = rng.uniform(0.75, 0.98)
    else:
        enhancing = necrosis + rng.uniform(0.2, 0.35)
    return Tumour(
        centre=centre,
        side=side,
        midline=float(brain_centre[0]),
        semi_axes=semi_axes,
        rotation=rotation,
        satellites=satellites,
        shape_noise=rng.uniform(0.18, 0.35),
        necrosis_level=necrosis,
        enhancing_level=enhancing,
        enhancing_threshold=rng.uniform(-1.3, -0.2),
        edema_extent=rng.uniform(1.2, 1.75) if high else rng.uniform(1.1, 1.5),
        edema_noise=rng.uniform(0.2, 0.45),
        mass_effect=rng.uniform(0.15, 0.45) if high else rng.uniform(0.05, 0.25),
    )


@dataclass
class Brain:
    """Random parameters of the normal anatomy."""

    centre: np.ndarray  # mm, relative to the volume centre
    semi_axes: np.ndarray  # mm: left-right, anterior-posterior, inferior-superior
    ventricle_scale: float  # lateral-ventricle size (atrophy / age)
    cortex_thickness: float  # mm


def draw_brain(rng: np.random.Generator) -> Brain:
    """Anatomy parameters: brain size and position, ventricle size, cortical thickness."""
    return Brain(
        centre=np.array([0.0, -4.0, 2.0]) + rng.normal(0.0, 2.0, size=3),
        semi_axes=np.array([68.0, 86.0, 62.0]) * rng.uniform(0.93, 1.07, size=3),
        ventricle_scale=float(rng.uniform(0.7, 1.5)),
        cortex_thickness=float(rng.uniform(2.5, 3.5)),
    )


def mass_effect_coordinates(grid: Grid, brain: Brain, tumour: Tumour):
    """Coordinates (relative to the brain centre) of the deep anatomy, pushed away from the tumour.

    Sampling the ventricles, deep nuclei and midline at ``p - u(p)`` with ``u`` pointing away
    from the tumour displaces them outward, the compression and midline shift of a large glioma.
    """
    x, y, z = (np.broadcast_to(o, grid.shape).copy() for o in grid.offsets(brain.centre))
    reach = 2.0 * tumour.radius
    box = grid.box_around(tumour.centre, 3.0 * reach)
    dx, dy, dz = grid.crop(box).offsets(tumour.centre)
    falloff = tumour.mass_effect * np.exp(-(dx**2 + dy**2 + dz**2) / (2.0 * reach**2))
    x[box] -= falloff * dx
    y[box] -= falloff * dy
    z[box] -= falloff * dz
    return x, y, z


def normal_anatomy(rng: np.random.Generator, grid: Grid, brain: Brain, tumour: Tumour):
    """Tissue map of the healthy brain (CSF, GM, WM) and the depth below the brain surface (mm)."""
    a, b, c = brain.semi_axes
    x, y, z = grid.offsets(brain.centre)
    # Brain outline: an ellipsoid, narrower frontally and flatter inferiorly, with a smooth
    # random bulge so no two brains share a silhouette.
    width = a * (1.0 - 0.08 * y / b) * (1.0 - 0.12 * np.clip(-z / c, 0, None))
    radius = np.sqrt((x / width) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    radius = radius / (1.0 + 0.04 * smooth_field(rng, grid, 30.0))
    depth = (1.0 - radius) * float(np.mean(brain.semi_axes))  # approximate distance to surface
    brain_mask = depth > 0

    # Cortex: the zero level set of a random field forms sheet-like sulci; grey matter lies
    # within a cortical thickness of the surface or of a sulcus, CSF in a thin rim and the sulci.
    gyri = np.abs(smooth_field(rng, grid, 3.5)) * 3.0  # ~ distance (mm) to the nearest sulcus
    sulcal = depth < 20.0
    csf = (depth < 1.2) | (sulcal & (gyri < 0.6))
    gm = (depth < brain.cortex_thickness) | (sulcal & (gyri < brain.cortex_thickness))

    xi, yi, zi = mass_effect_coordinates(grid, brain, tumour)
    v = brain.ventricle_scale
    for side in (-1.0, 1.0):
        # Deep grey nuclei (thalamus / basal ganglia) beside the ventricles.
        gm |= ellipsoid_radius((xi - side * 15.0, yi + 4.0, zi + 4.0), (8.0, 15.0, 9.0)) < 1.0
        # Lateral ventricle: a body arching over the nuclei, diverging posteriorly.
        centre_x = side * (7.0 * v + 0.12 * np.clip(-yi, 0, None))
        centre_z = 10.0 - 0.008 * yi**2
        csf |= ellipsoid_radius((xi - centre_x, yi + 3.0, zi - centre_z), (4.0 * v, 28.0, 6.0 * v)) < 1.0
    csf |= ellipsoid_radius((xi, yi + 5.0, zi + 4.0), (1.2 * v, 10.0, 7.0)) < 1.0  # third ventricle
    fissure = (np.abs(xi) < 1.2) & ((zi > 20.0) | (np.abs(yi) > 45.0))  # spares the corpus callosum
    csf |= fissure

    tissue = np.full(grid.shape, WM, dtype=np.uint8)
    tissue[gm] = GM
    tissue[csf] = CSF
    tissue[~brain_mask] = BACKGROUND
    return tissue, depth


def add_tumour(rng: np.random.Generator, grid: Grid, tissue: np.ndarray, depth: np.ndarray, tumour: Tumour) -> None:
    """Paint the tumour into ``tissue`` in place (only a box around it is computed).

    The core is where an irregular "level" (normalised distance to the tumour centre plus a
    smooth random perturbation, the union of the main body and satellites) is below 1. Inside
    it: necrosis below ``necrosis_level``, a patchy enhancing layer from there out to
    ``enhancing_level``, non-enhancing tumour elsewhere. Oedema occupies the next shell out to
    ``edema_extent`` with its own perturbation, in white matter and deep grey matter only,
    since vasogenic oedema follows the white-matter tracts and spares the cortex, and on the
    tumour's side of the midline (the falx stops it).
    """
    reach = tumour.radius * (tumour.edema_extent + 3 * tumour.edema_noise + 1.5) * 1.3
    box = grid.box_around(tumour.centre, reach)
    sub = grid.crop(box)
    level = ellipsoid_radius(sub.offsets(tumour.centre), tumour.semi_axes, tumour.rotation)
    for centre, radius in tumour.satellites:
        level = np.minimum(level, ellipsoid_radius(sub.offsets(centre), (radius,) * 3))
    level = level + tumour.shape_noise * smooth_field(rng, sub, 0.5 * tumour.radius)
    necrosis_level = level + 0.12 * smooth_field(rng, sub, 0.3 * tumour.radius)
    patchy = smooth_field(rng, sub, 0.35 * tumour.radius) > tumour.enhancing_threshold
    edema_level = level - tumour.edema_noise * smooth_field(rng, sub, 10.0)

    local = tissue[box]  # a view: writes go into ``tissue``
    brain = local != BACKGROUND
    core = brain & (level < 1.0)
    necrosis = core & (necrosis_level < tumour.necrosis_level)
    enhancing = core & ~necrosis & (level < tumour.enhancing_level) & patchy
    white = (local == WM) | ((local == GM) & (depth[box] > 6.0))
    same_side = tumour.side * (sub.offsets((tumour.midline, 0.0, 0.0))[0]) > 1.0
    edema = white & same_side & ~core & (edema_level < tumour.edema_extent)
    local[edema] = EDEMA
    local[core] = NON_ENHANCING
    local[enhancing] = ENHANCING
    local[necrosis] = NECROSIS


# ---------------------------------------------------------------------------------------------
# imaging


@dataclass
class Acquisition:
    """Per-case, per-modality scanner parameters."""

    scale: np.ndarray  # signal of white matter, arbitrary scanner units
    offset: np.ndarray  # added inside the brain, as a fraction of ``scale``
    noise: np.ndarray  # Rician noise sigma, as a fraction of ``scale``
    bias: np.ndarray  # amplitude of the log bias field


def draw_acquisition(rng: np.random.Generator) -> Acquisition:
    """Intensity scale, offset, noise and bias-field strength for each of the four modalities."""
    n = len(MODALITIES)
    return Acquisition(
        scale=np.exp(rng.uniform(np.log(250.0), np.log(1200.0), size=n)).astype(np.float32),
        offset=rng.uniform(0.0, 0.1, size=n).astype(np.float32),
        noise=rng.uniform(0.015, 0.04, size=n).astype(np.float32),
        bias=rng.uniform(0.05, 0.15, size=n).astype(np.float32),
    )


def tissue_signal(tissue: np.ndarray, modality: int) -> np.ndarray:
    """Relative signal of each voxel's tissue in one modality (0 outside the brain)."""
    lookup = np.zeros(len(TISSUE_NAMES), dtype=np.float32)
    for code, values in CONTRAST.items():
        lookup[code] = values[modality]
    return lookup[tissue]


def acquire(
    rng: np.random.Generator, noise_rng: np.random.Generator, grid: Grid, tissue: np.ndarray, scanner: Acquisition
) -> dict[str, np.ndarray]:
    """Simulate the four scans of a tissue map.

    Texture (cellularity: stronger in tumour) multiplies the tissue signal, a Gaussian blur of
    0.8 voxel stands in for partial volume, then a smooth bias field, the case's scale and
    in-brain offset, and Rician noise (the magnitude of a complex signal with Gaussian noise
    in both channels). Background stays exactly zero, as after skull stripping. Values are
    rounded to integers so that the int16 files hold exactly these arrays.
    """
    brain = tissue != BACKGROUND
    tumour = tissue >= EDEMA
    texture = smooth_field(rng, grid, 3.0)
    texture = 1.0 + np.where(tumour, 0.08, 0.03).astype(np.float32) * texture
    images = {}
    for m, name in enumerate(MODALITIES):
        signal = gaussian_filter(tissue_signal(tissue, m) * texture, sigma=0.8)
        signal *= np.exp(scanner.bias[m] * smooth_field(rng, grid, 60.0))
        signal = scanner.scale[m] * (signal + scanner.offset[m])
        sigma = scanner.noise[m] * scanner.scale[m]
        real = signal + sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        imag = sigma * noise_rng.standard_normal(grid.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
        image[~brain] = 0.0
        images[name] = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.float32)
    return images


def to_brats_label(tissue: np.ndarray) -> np.ndarray:
    """BraTS 2018-2021 label (0/1/2/4) of a tissue map."""
    lookup = np.zeros(len(TISSUE_NAMES), dtype=np.uint8)
    for code, value in BRATS_LABEL.items():
        lookup[code] = value
    return lookup[tissue]


def make_case(index: int, size: int = 96, seed: int = 0) -> PhantomCase:
    """Generate case ``index`` of the data set ``seed`` on a ``size``-voxel grid.

    The case depends only on ``(seed, index)`` (and ``size`` for the sampling), never on how
    many other cases are generated. Anatomy and voxel noise use separate random streams so the
    number of voxels cannot shift the anatomy's random draws.
    """
    _check_int("index", index, 0)
    _check_int("size", size, 16)
    _check_int("seed", seed, 0)
    anatomy_seed, noise_seed = np.random.SeedSequence([seed, index]).spawn(2)
    rng = np.random.default_rng(anatomy_seed)
    grade = "HGG" if rng.random() < P_HGG else "LGG"
    brain = draw_brain(rng)
    tumour = draw_tumour(rng, grade, brain.centre, brain.semi_axes)
    scanner = draw_acquisition(rng)

    grid = Grid.for_size(size)
    tissue, depth = normal_anatomy(rng, grid, brain, tumour)
    add_tumour(rng, grid, tissue, depth, tumour)
    images = acquire(rng, np.random.default_rng(noise_seed), grid, tissue, scanner)
    return PhantomCase(
        index=index, images=images, label=to_brats_label(tissue), tissue=tissue, affine=brats_affine(size), grade=grade
    )


def _check_int(name: str, value, minimum: int) -> None:
    """Raise PhantomError unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PhantomError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise PhantomError(f"{name} must be at least {minimum}, got {value}")


# ---------------------------------------------------------------------------------------------
# files and layouts

# BraTS 2023 file suffix of each modality (the older releases use the modality names).
BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# MSD Task01_BrainTumour: channel order of the 4-D image, and label of each BraTS label.
MSD_CHANNELS = ("flair", "t1", "t1ce", "t2")
MSD_FROM_BRATS = {1: 2, 2: 1, 4: 3}
BRATS2023_FROM_BRATS = {1: 1, 2: 2, 4: 3}
# Institutions in BraTS 2018 case names (CBICA cases carry a three-letter code).
BRATS2018_INSTITUTIONS = ("CBICA", "TCIA01", "CBICA", "2013", "TCIA08", "TCIA02")
GZIP_LEVEL = 1  # nibabel's default: noisy int16 ends ~6% larger than at level 6, in half the time


def relabel(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Map BraTS 2018-2021 label values to another convention (background stays 0)."""
    lookup = np.zeros(5, dtype=np.uint8)
    for source, target in mapping.items():
        lookup[source] = target
    return lookup[label]


def nifti_bytes(array: np.ndarray, affine: np.ndarray, dtype) -> bytes:
    """A gzipped NIfTI-1 file in memory, byte-identical for identical input.

    Compressing with ``mtime=0`` and no file name in the gzip header (unlike nibabel's own
    writer, which records both) keeps files reproducible and independent of the temp name.
    """
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=GZIP_LEVEL, mtime=0)


def _write_image(path: Path, image: np.ndarray, affine: np.ndarray) -> None:
    write_bytes_atomic(path, nifti_bytes(image, affine, np.int16))


def _write_label(path: Path, label: np.ndarray, affine: np.ndarray) -> None:
    write_bytes_atomic(path, nifti_bytes(label, affine, np.uint8))


def brats2018_case_id(index: int) -> str:
    """``Brats18_<inst>_<id>_1`` with a unique, deterministic institution and id per index."""
    institution = BRATS2018_INSTITUTIONS[index % len(BRATS2018_INSTITUTIONS)]
    if institution == "CBICA":
        letters = string.ascii_uppercase
        code = "".join(letters[(index // 26**k) % 26] for k in (2, 1, 0))
        return f"Brats18_CBICA_{code}_1"
    return f"Brats18_{institution}_{index + 1}_1"


def write_brats_case(out_dir: Path, layout: str, case: PhantomCase, labeled: bool) -> str:
    """Write one case folder of a BraTS layout; return its case id."""
    if layout == "brats2018":
        case_id = brats2018_case_id(case.index)
        folder = out_dir / case.grade / case_id
        names = {m: f"{case_id}_{m}" for m in MODALITIES} | {"seg": f"{case_id}_seg"}
        label = case.label
    elif layout == "brats2021":
        case_id = f"BraTS2021_{case.index:05d}"
        folder = out_dir / case_id
        names = {m: f"{case_id}_{m}" for m in MODALITIES} | {"seg": f"{case_id}_seg"}
        label = case.label
    else:  # brats2023
        case_id = f"BraTS-GLI-{case.index:05d}-000"
        folder = out_dir / case_id
        names = {m: f"{case_id}-{BRATS2023_SUFFIX[m]}" for m in MODALITIES} | {"seg": f"{case_id}-seg"}
        label = relabel(case.label, BRATS2023_FROM_BRATS)
    for modality in MODALITIES:
        _write_image(folder / f"{names[modality]}.nii.gz", case.images[modality], case.affine)
    if labeled:
        _write_label(folder / f"{names['seg']}.nii.gz", label, case.affine)
    return case_id


def write_msd_case(out_dir: Path, case: PhantomCase, labeled: bool) -> str:
    """Write one MSD Task01 case: a 4-D image (FLAIR, T1w, T1gd, T2w) and, if labeled, its label."""
    case_id = f"BRATS_{case.index + 1:03d}"
    image = np.stack([case.images[m] for m in MSD_CHANNELS], axis=-1)
    _write_image(out_dir / ("imagesTr" if labeled else "imagesTs") / f"{case_id}.nii.gz", image, case.affine)
    if labeled:
        _write_label(out_dir / "labelsTr" / f"{case_id}.nii.gz", relabel(case.label, MSD_FROM_BRATS), case.affine)
    return case_id


def msd_dataset_json(training: list[str], test: list[str]) -> dict:
    """The ``dataset.json`` of an MSD task, in the Task01_BrainTumour style."""
    return {
        "name": "BRATS",
        "description": "Synthetic BraTS-like gliomas (brats-kd phantom), Task01_BrainTumour layout",
        "reference": "generated by tools/phantom.py",
        "licence": "n/a (synthetic data)",
        "release": "synthetic",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in training],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }


def check_arguments(out_dir, layout: str, cases: int, unlabeled: int, size: int, seed: int) -> Path:
    """Validate everything before the first byte is written; return the output folder."""
    if layout not in LAYOUTS:
        raise PhantomError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    _check_int("cases", cases, 0)
    _check_int("unlabeled", unlabeled, 0)
    _check_int("size", size, 16)
    _check_int("seed", seed, 0)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PhantomError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise PhantomError(f"output folder {out} already contains files; choose a new or empty folder")
    return out


def write_dataset(
    out_dir, layout: str = "brats2021", cases: int = 10, unlabeled: int = 0, size: int = 96, seed: int = 0
) -> list[str]:
    """Write ``cases`` labeled and ``unlabeled`` unlabeled phantom cases in a real on-disk layout.

    Labeled cases are indices ``0 .. cases-1``, unlabeled ones continue from ``cases``; each is
    :func:`make_case` of its index, so a data set is a prefix of any larger one with the same
    seed. Returns the case ids in index order. Raises :class:`PhantomError` (nothing written)
    for an unknown layout, invalid numbers, or an output folder that already contains files.
    """
    out = check_arguments(out_dir, layout, cases, unlabeled, size, seed)
    out.mkdir(parents=True, exist_ok=True)
    labeled_ids, unlabeled_ids = [], []
    for index in range(cases + unlabeled):
        case = make_case(index, size, seed)
        labeled = index < cases
        if layout == "msd":
            case_id = write_msd_case(out, case, labeled)
        else:
            case_id = write_brats_case(out, layout, case, labeled)
        (labeled_ids if labeled else unlabeled_ids).append(case_id)
    if layout == "msd":
        text = json.dumps(msd_dataset_json(labeled_ids, unlabeled_ids), indent=2) + "\n"
        write_bytes_atomic(out / "dataset.json", text.encode())
    return labeled_ids + unlabeled_ids


def main(
    out: str | None = None,
    cases: int = 10,
    unlabeled: int = 0,
    size: int = 96,
    seed: int = 0,
    layout: str = "brats2021",
) -> None:
    """Write a synthetic BraTS-like data set (see the module docstring)."""
    try:
        if out is None:
            raise PhantomError("--out is required")
        ids = write_dataset(str(out), layout=layout, cases=cases, unlabeled=unlabeled, size=size, seed=seed)
    except PhantomError as error:
        print(f"phantom: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {cases} labeled + {unlabeled} unlabeled {layout} cases ({len(ids)} total) to {out}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
