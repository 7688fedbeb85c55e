"""Figures of an experiment report: Dice bars, training curves, and a KD-Net Fig. 2-style slice."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from brats_kd.io import write_bytes_atomic  # noqa: E402

REGION_COLOURS = {"wt": "#2ca02c", "tc": "#ffbf00", "et": "#d62728"}
# Models shown in the bar chart and curves, in this order when present.
PREFERRED = ("baseline", "teacher", "student", "member_unet", "member_resunet", "member_cascade",
             "ensemble", "manual_student", "omni_student")


DPI = 110


def _save(fig, path: Path, tight: bool = True) -> Path:
    """PNG at :data:`DPI`; ``tight=False`` keeps the figure's own size (``figsize`` × DPI pixels)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight" if tight else None)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _shown_models(agg: dict) -> list[str]:
    return [m for m in PREFERRED if m in agg] + sorted(m for m in agg if m not in PREFERRED)


def dice_bars(agg: dict, path: Path) -> Path:
    """Grouped bars of Dice per region, error bars = std over folds."""
    models = _shown_models(agg)
    regions = ("et", "tc", "wt")
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) + 3), 4))
    for i, model in enumerate(models):
        means = [agg[model][f"dice_{r}"]["mean"] for r in regions]
        stds = [agg[model][f"dice_{r}"]["std"] or 0.0 for r in regions]  # None: one fold, no error bar
        xs = np.arange(len(regions)) + (i - (len(models) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=model)
    ax.set_xticks(np.arange(len(regions)), [r.upper() for r in regions])
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (mean ± std over folds)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def read_scalars(train_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of a training's TensorBoard event files: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(train_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags().get("scalars", []):
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in scalars.items()}


def training_curves(out: Path, fold: int, models: list[str], path: Path) -> Path | None:
    """Training loss terms (per iteration) and validation mean Dice (per epoch) of one fold."""
    curves = {m: read_scalars(out / f"fold{fold}" / m / "train") for m in models}
    curves = {m: c for m, c in curves.items() if c}
    if not curves:
        return None
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(12, 4))
    for model, scalars in curves.items():
        for tag in ("train_loss", "loss", "loss_gt", "loss_kd", "loss_kl"):
            if tag in scalars:
                steps, values = zip(*scalars[tag])
                style = "-" if tag in ("train_loss", "loss") else ":"
                ax_loss.plot(steps, values, style, label=f"{model} {tag}", linewidth=1)
        if "val_mean_dice" in scalars:
            steps, values = zip(*scalars["val_mean_dice"])
            ax_dice.plot(steps, values, marker=".", label=model)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("validation mean Dice (TC, WT, ET)")
    ax_dice.set_ylim(0, 1)
    ax_dice.legend(fontsize=8)
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.suptitle(f"Training curves, fold {fold}")
    return _save(fig, path)


def _regions(labels: np.ndarray) -> dict[str, np.ndarray]:
    """BraTS label map (1/2/4) → the evaluated regions."""
    return {"wt": np.isin(labels, (1, 2, 4)), "tc": np.isin(labels, (1, 4)), "et": labels == 4}


def _reference_labels(case: dict, datalist: dict) -> np.ndarray:
    """A case's reference in BraTS values, via the datalist's label mapping (never rewriting the file)."""
    import nibabel as nib

    raw = np.asarray(nib.load(Path(datalist["dataset_dir"]) / case["label"]).dataobj).astype(np.int16)
    mapping = case.get("label_map", datalist.get("label_map", {"orig": [1, 2, 4], "target": [1, 2, 4]}))
    labels = np.zeros_like(raw)
    for orig, target in zip(mapping["orig"], mapping["target"]):
        labels[raw == orig] = target
    return labels


def qualitative(out: Path, results: dict, models: list[str], path: Path) -> Path | None:
    """T1ce slice through the tumour with the reference and each model's contours (KD-Net Fig. 2).

    The case shown is the fold-0 test case with the largest reference tumour (so the regions are
    visible), not one chosen for a favourable result; the slice is the axial slice of largest WT area.
    """
    import nibabel as nib

    datalist_file = out / "datalist.json"
    models = [m for m in models if 0 in results.get(m, {})]
    if not datalist_file.exists() or not models:
        return None
    datalist = json.loads(datalist_file.read_text())
    cases = {c["case_id"]: c for c in datalist["training"] if c.get("source", "manual") == "manual"}
    candidates = [cid for cid in results[models[0]][0] if cid in cases]
    if not candidates:
        return None
    references = {cid: _reference_labels(cases[cid], datalist) for cid in candidates}
    case_id = max(candidates, key=lambda cid: int((references[cid] > 0).sum()))
    reference = references[case_id]
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))
    channel = datalist.get("channel_index", {}).get("t1ce", 0)
    image = np.asarray(nib.load(Path(datalist["dataset_dir"]) / cases[case_id]["t1ce"]).dataobj, dtype=np.float32)
    image = image[..., channel] if image.ndim == 4 else image
    panels = [("reference", reference)]
    for model in models:
        prediction = out / "fold0" / model / "evaluate" / "predictions" / f"{case_id}.nii.gz"
        if prediction.exists():
            panels.append((model, np.asarray(nib.load(prediction).dataobj)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    axes = np.atleast_1d(axes)
    background = np.rot90(image[:, :, z])
    for ax, (title, labels) in zip(axes, panels):
        ax.imshow(background, cmap="gray")
        for region, mask in _regions(labels[:, :, z]).items():
            if mask.any():
                ax.contour(np.rot90(mask.astype(float)), levels=[0.5], colors=REGION_COLOURS[region], linewidths=1.2)
        dice = results.get(title, {}).get(0, {}).get(case_id, {})
        subtitle = "" if title == "reference" else "\nDice ET/TC/WT " + "/".join(
            f"{dice.get(f'dice_{r}', math.nan):.2f}" for r in ("et", "tc", "wt"))
        ax.set_title(title + subtitle, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case_id}, axial slice {z} (T1ce); contours: WT green, TC amber, ET red", fontsize=10)
    return _save(fig, path)


def draw_all(out: Path, results: dict, agg: dict) -> list[tuple[str, Path]]:
    """Draw every figure the results allow; return ``(title, path)`` pairs for the report."""
    models = _shown_models(agg)
    pictures = [("Dice per region", dice_bars(agg, out / "dice_bars.png"))]
    curves = training_curves(out, 0, models, out / "training_curves.png")
    if curves:
        pictures.append(("Training curves (fold 0)", curves))
    shown = [m for m in ("baseline", "student", "teacher", "ensemble", "manual_student", "omni_student") if m in agg]
    picture = qualitative(out, results, shown, out / "qualitative.png")
    if picture:
        pictures.append(("Qualitative result (fold 0)", picture))
    return pictures


def heatmap_size(rows: int) -> tuple[float, float]:
    """``(width, height)`` in inches of :func:`missing_heatmap` with ``rows`` rows: 6.5 wide, 1.4 + 0.42 per row high."""
    return 6.5, 1.4 + 0.42 * rows


def missing_heatmap(labels: list[str], values: list[list[float | None]], columns: list[str], path: Path) -> Path:
    """Student − baseline Dice per subset (rows, ``labels``) and region (``columns``), each value written in its
    cell; a diverging map centred on 0 (blue: the student is better, red: worse), grey where a value is missing.

    The size is fixed by the row count (:func:`heatmap_size` × :data:`DPI` pixels), so that 15 rows stay legible.
    """
    matrix = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    matrix = matrix.reshape(len(labels), len(columns))
    finite = np.abs(matrix[np.isfinite(matrix)])
    limit = max(float(finite.max()) if finite.size else 0.0, 0.01)  # never a zero-width colour scale
    colours = plt.get_cmap("RdBu").copy()
    colours.set_bad("#d9d9d9")
    fig, ax = plt.subplots(figsize=heatmap_size(len(labels)), layout="constrained")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colours, vmin=-limit, vmax=limit, aspect="auto")
    for i, j in np.ndindex(matrix.shape):
        value = matrix[i, j]
        text = "–" if not np.isfinite(value) else f"{value:+.3f}"
        dark = np.isfinite(value) and abs(value) > 0.6 * limit
        ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(labels)), labels, fontsize=9)
    ax.set_xlabel("region")
    ax.set_title("Dice, KD student − baseline (mean over folds)", fontsize=10)
    fig.colorbar(image, ax=ax, label="student − baseline")
    return _save(fig, path, tight=False)
