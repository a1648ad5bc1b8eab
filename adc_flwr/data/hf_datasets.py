"""Hub, parquet and imagefolder sources: one code path through ``datasets.load_dataset``.

Only the loader arguments differ between the three. Loading reads the labels and the image
headers; pixels are decoded later, row by row, by :class:`LazyImages`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adc_flwr.data.images import LazyImages, image_table, numeric_images, plan_decoding
from adc_flwr.data.splits import DataError, ImageSplit, carve_test
from adc_flwr.hub import hub_unreachable

_LABEL_NAMES = ("label", "labels", "fine_label")
_IMAGE_NAMES = ("img", "image")


def load_hf_style(
    kind: str, target: str, data_dir: str
) -> tuple[ImageSplit, ImageSplit, list[str]]:
    """Load through ``datasets.load_dataset``; one path for the hub and local files.

    - image column: the first ``Image`` feature, else a column named ``img``/``image``
      (a numeric array column works too; it is read whole, not lazily).
    - label column: ``label``/``labels``/``fine_label`` if present (ClassLabel or not), else
      the first ``ClassLabel``. Plain int labels give classes ``0..max`` when those ids are
      mostly used (docs/configuration.md#classes); strings are sorted.
    - colour and size: one mode and square side for all splits, from the image headers
      (see :func:`~adc_flwr.data.images.plan_decoding`).
    - splits: ``test`` if present, else a fixed stratified 20 % carved from train; train is
      ``train`` if present, else the first split.
    - relative ``parquet:``/``imagefolder:`` paths resolve against ``data-dir`` when set;
      for ``hf:`` a non-empty ``data-dir`` is the Hugging Face cache dir.
    """
    import datasets

    if kind == "hf":
        args: dict[str, Any] = {"path": target}
        if data_dir:
            args["cache_dir"] = data_dir
        _check_hub_reachable(target)
        what = f"hub dataset {target!r}"
    else:
        path = Path(target).expanduser()
        if not path.is_absolute() and data_dir:
            path = Path(data_dir).expanduser() / path
        if not path.exists():
            raise DataError(
                f"dataset='{kind}:{target}': {path} does not exist. Give an existing "
                f"{'parquet file or folder' if kind == 'parquet' else 'image folder'} "
                "(relative paths resolve against the `data-dir` run-config key when it is set)."
            )
        if kind == "parquet":
            if path.is_file():
                args = {"path": "parquet", "data_files": {"train": str(path)}}
            else:
                args = {"path": "parquet", "data_dir": str(path)}
        else:
            if not path.is_dir():
                raise DataError(f"dataset='imagefolder:{target}': {path} is not a folder.")
            args = {"path": "imagefolder", "data_dir": str(path)}
            _report_skipped_files(path)
        what = f"{kind} data at {path}"
    try:
        with warnings.catch_warnings(), _quiet_datasets():
            warnings.simplefilter("ignore")
            dsd = datasets.load_dataset(**args)
    except ConnectionError as exc:
        raise DataError(_hub_offline_help(target, str(exc))) from exc
    except Exception as exc:
        hint = (
            "Check the hub id (e.g. 'hf:uoft-cs/cifar100'); without network use a local copy "
            "via 'parquet:<dir>' or 'imagefolder:<dir>'."
            if kind == "hf"
            else "Check that the folder holds the expected files (parquet files, or "
            "<class>/<image> folders, optionally under train/ and test/)."
        )
        raise DataError(f"Could not load {what}: {type(exc).__name__}: {exc}. {hint}") from exc
    if not isinstance(dsd, datasets.DatasetDict) or len(dsd) == 0:
        raise DataError(f"{what} gave no splits.")
    if kind == "imagefolder":
        _check_class_folders(path, next(iter(dsd.values())).features)
    with _quiet_datasets():
        return _from_dataset_dict(dsd, what)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No datasets progress bars while loading: every Ray actor would print its own."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _hub_offline_help(hub_id: str, detail: str) -> str:
    import datasets

    cache = (
        "HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it, so"
        if datasets.config.HF_HUB_OFFLINE
        else "If it is already in the local Hugging Face cache, set HF_HUB_OFFLINE=1;"
    )
    return (
        f"The Hugging Face Hub is unreachable, so dataset='hf:{hub_id}' cannot be downloaded "
        f"({detail}). {cache} otherwise copy the data here and use "
        "dataset='parquet:<dir or file>' or 'imagefolder:<dir>' (local files go through "
        "the same loader, offline)."
    )


class SkippedFilesWarning(UserWarning):
    """An image folder holds files that are not images; they are not loaded."""


def _report_skipped_files(folder: Path) -> None:
    """``datasets``' imagefolder leaves out files without an image extension silently; say
    which (a metadata file excepted), so that no sample goes missing unnoticed."""
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    known = {ext.lower() for ext in IMAGE_EXTENSIONS}
    skipped = sorted(
        str(f.relative_to(folder))
        for f in folder.rglob("*")
        if f.is_file()
        and f.suffix.lower() not in known
        and not f.name.startswith(".")
        and f.stem != "metadata"
    )
    if skipped:
        listed = ", ".join(skipped[:5]) + (
            f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        warnings.warn(
            f"imagefolder {folder}: {len(skipped)} file(s) are not images and are not loaded: "
            f"{listed}",
            SkippedFilesWarning,
            stacklevel=2,
        )


def _check_class_folders(folder: Path, features: Any) -> None:
    """An image folder whose images all lie in one folder gets no label column from
    ``datasets`` (it labels by folder only when there are two or more): say so, naming it,
    instead of "Cannot find the label column"."""
    import datasets
    from datasets.packaged_modules.imagefolder.imagefolder import IMAGE_EXTENSIONS

    if any(n in features for n in _LABEL_NAMES) or any(
        isinstance(f, datasets.ClassLabel) for f in features.values()
    ):
        return
    known = {ext.lower() for ext in IMAGE_EXTENSIONS}
    classes = {f.parent for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in known}
    if len({c.name for c in classes}) == 1:
        where = ", ".join(sorted(str(c) for c in classes))
        raise DataError(
            f"dataset='imagefolder:{folder}': its images are all of one class (folder {where}): "
            "a classifier needs at least 2; give each class a folder of its own "
            "(<class>/<image>, optionally under train/ and test/)"
        )


def _check_hub_reachable(hub_id: str) -> None:
    """Fail in seconds, not after the hub client's ~25 s of retries, when there is no network."""
    if problem := hub_unreachable():
        raise DataError(_hub_offline_help(hub_id, problem))


def _pick_columns(features: Any) -> tuple[str, str]:
    import datasets

    image_col = next(
        (n for n, f in features.items() if isinstance(f, datasets.Image)),
        next((n for n in _IMAGE_NAMES if n in features), None),
    )
    label_col = next(
        (n for n in _LABEL_NAMES if n in features),
        next((n for n, f in features.items() if isinstance(f, datasets.ClassLabel)), None),
    )
    if image_col is None or label_col is None:
        raise DataError(
            f"Cannot find the {'image' if image_col is None else 'label'} column among "
            f"{list(features)}: expected an Image feature or a column named img/image, and a "
            "ClassLabel or a column named label/labels/fine_label."
        )
    return image_col, label_col


def _from_dataset_dict(dsd: Any, what: str) -> tuple[ImageSplit, ImageSplit, list[str]]:
    import datasets

    train_name = "train" if "train" in dsd else next(iter(dsd))
    train_ds = dsd[train_name]
    test_ds = dsd["test"] if "test" in dsd and train_name != "test" else None
    image_col, label_col = _pick_columns(train_ds.features)
    parts = [train_ds] if test_ds is None else [train_ds, test_ds]
    names, encoded = _encode_labels(parts, label_col, train_ds.features[label_col], what)

    # (part, rows) of train and test: both are rows of train when test is carved from it.
    if test_ds is None:
        train_idx, test_idx = carve_test(encoded[0])
        views = [(0, train_idx), (0, test_idx)]
    else:
        views = [(0, np.arange(len(train_ds))), (1, np.arange(len(test_ds)))]
    images: list[np.ndarray | LazyImages]
    if isinstance(train_ds.features[image_col], datasets.Image):
        tables = [image_table(p, image_col) for p in parts]
        plan = plan_decoding(tables, what)
        images = [LazyImages(tables[p], rows, plan, what) for p, rows in views]
    else:
        arrays = [_numeric_column(p, image_col, what) for p in parts]
        images = [arrays[p][rows] for p, rows in views]
    train, test = (
        ImageSplit(img, encoded[p][rows]) for img, (p, rows) in zip(images, views, strict=True)
    )
    return train, test, names


def _encode_labels(
    parts: Sequence[Any], column: str, feature: Any, what: str
) -> tuple[list[str], list[np.ndarray]]:
    """Class names and int64 labels per part (the label column only: no image is read).

    A ClassLabel column keeps its names and must stay within them; a plain column must hold
    integers (classes ``0..max``) or strings (classes sorted by name), never a null, NaN or
    fraction: each is a :class:`DataError` naming the column, split and row."""
    import datasets

    raw_labels = [_column(p, column) for p in parts]
    for part, values in enumerate(raw_labels):
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                raise DataError(
                    f"{what}: column {column!r} has no label in row {row} of split {part} "
                    f"({value!r}): drop or label such rows"
                )
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        encoded = [np.asarray(r, dtype=np.int64) for r in raw_labels]
    else:
        values = [v for r in raw_labels for v in r]
        if all(_is_integral(v) for v in values):
            encoded = _int_labels(raw_labels, column, what)
            names = [str(i) for i in range(_dense_classes(encoded, column, what))]
        elif all(isinstance(v, str) for v in values):
            names = sorted(set(values))
            lookup = {n: i for i, n in enumerate(names)}
            encoded = [np.asarray([lookup[v] for v in r], dtype=np.int64) for r in raw_labels]
        else:
            part, row, value = next(
                (p, i, v)
                for p, r in enumerate(raw_labels)
                for i, v in enumerate(r)
                if not (_is_integral(v) or isinstance(v, str))
            )
            raise DataError(
                f"{what}: column {column!r} holds {value!r} in row {row} of split {part}: "
                "labels are integers (class ids) or strings (class names), not fractions or "
                "a mix of both"
            )
    for part, labels in enumerate(encoded):
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            row = int(np.flatnonzero((labels < 0) | (labels >= len(names)))[0])
            raise DataError(
                f"{what}: column {column!r} holds label {int(labels[row])} in row {row} of "
                f"split {part}, outside the {len(names)} classes 0..{len(names) - 1} "
                "(negative: unlabelled rows?)"
            )
    if len(names) < 2:
        raise DataError(
            f"{what}: column {column!r} gives {len(names)} class(es) {names}: a classifier "
            "needs at least 2"
        )
    return names, encoded


def _is_integral(value: Any) -> bool:
    """An int (not a bool), or a float with no fractional part (3.0 from a float column)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


# At most this share of the ids 0..max of plain integer labels may be missing from the data
# (and at least one): a sample may miss the odd class, but ids that leave more empty are codes,
# not class ids, and each empty one would be an output the model is trained never to predict.
MAX_EMPTY_CLASS_SHARE = 0.1


def _int_labels(raw_labels: list[list[Any]], column: str, what: str) -> list[np.ndarray]:
    """Integral labels as int64 arrays; one past int64 is a :class:`DataError` naming it."""
    encoded = []
    for part, values in enumerate(raw_labels):
        ints = [int(v) for v in values]
        try:
            encoded.append(np.asarray(ints, dtype=np.int64))
        except OverflowError:
            row = next(i for i, v in enumerate(ints) if not -(2**63) <= v < 2**63)
            raise DataError(
                f"{what}: column {column!r} holds label {values[row]!r} in row {row} of split "
                f"{part}, past 64-bit integers: labels are class ids 0..K-1"
            ) from None
    return encoded


def _dense_classes(encoded: list[np.ndarray], column: str, what: str) -> int:
    """The class count of plain integer labels: ``max + 1``, once the ids 0..max are known
    to be mostly used (:data:`MAX_EMPTY_CLASS_SHARE`); else a :class:`DataError` naming the
    column and the largest label, before anything of that size is made."""
    top = max((int(e.max()) for e in encoded if e.size), default=-1)
    used = np.unique(np.concatenate(encoded))
    empty = top + 1 - int((used >= 0).sum())
    allowed = max(1, int(MAX_EMPTY_CLASS_SHARE * (top + 1)))
    if empty > allowed:
        part = next(p for p, e in enumerate(encoded) if e.size and int(e.max()) == top)
        row = int(np.argmax(encoded[part]))
        raise DataError(
            f"{what}: column {column!r} holds label {top} in row {row} of split {part}, so its "
            f"integer labels would make {top + 1} classes 0..{top} of which {empty} hold no "
            f"sample (at most {allowed} may: a tenth, at least 1): labels are class ids 0..K-1; "
            "renumber them, or store the column as a ClassLabel (or as strings: class names)"
        )
    return top + 1


def _column(ds: Any, name: str) -> list[Any]:
    """A whole column as a list in one batch read (``ds[name]`` iterates row by row)."""
    return ds.select_columns([name])[:][name]


def _numeric_column(ds: Any, column: str, what: str) -> np.ndarray:
    return numeric_images(
        np.asarray(ds.with_format("numpy")[:][column]), f"{what}, column {column!r}"
    )
