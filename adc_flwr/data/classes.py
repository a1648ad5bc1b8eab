"""A label subset: the ``classes`` run-config key (and pretraining's ``--classes``).

``"0-4"`` or ``"5,6,7,8,9"`` (ranges and lists mix: ``"0,2,4-6"``) keeps those classes in
both splits and renumbers them 0..C-1 in the order given, so a model pretrained on some
classes can be fine-tuned on others with labels of its own. Empty: every class. The
statistics used for normalisation stay the dataset's (all classes): they describe the
images' source, not the label set.
"""

from __future__ import annotations

import numpy as np

from adc_flwr.config import parse_classes
from adc_flwr.data.splits import DataBundle, DataError, ImageSplit


def select_classes(data: DataBundle, spec: str) -> DataBundle:
    """``data`` restricted to the classes ``spec`` names, renumbered in its order.

    Raises :class:`DataError` naming the key for a class the dataset does not have, or a
    subset that leaves a split empty.
    """
    try:
        classes = parse_classes(spec)
    except ValueError as err:
        raise DataError(f"run-config key 'classes' = {spec!r}: {err}") from err
    if not classes:
        return data
    if len(classes) < 2:
        raise DataError(
            f"run-config key 'classes' = {spec!r}: a classifier needs at least 2 classes"
        )
    unknown = [c for c in classes if c >= data.num_classes]
    if unknown:
        raise DataError(
            f"run-config key 'classes' = {spec!r}: the dataset has classes 0.."
            f"{data.num_classes - 1} ({data.num_classes}), not {unknown}"
        )
    lookup = np.full(data.num_classes, -1, dtype=np.int64)
    lookup[classes] = np.arange(len(classes))
    splits = []
    for name, split in (("train", data.train), ("test", data.test)):
        rows = np.flatnonzero(lookup[split.labels] >= 0)
        if rows.size == 0:
            raise DataError(
                f"run-config key 'classes' = {spec!r}: the {name} split holds no sample of "
                "these classes"
            )
        images = split.images[rows] if isinstance(split.images, np.ndarray) else None
        if images is None:  # lazily decoded: a view of the same table, nothing decoded
            images = split.images.subset(rows)
        else:
            images.setflags(write=False)
        labels = lookup[split.labels[rows]]
        labels.setflags(write=False)
        splits.append(ImageSplit(images, labels))
    return DataBundle(
        train=splits[0],
        test=splits[1],
        num_classes=len(classes),
        class_names=[data.class_names[c] for c in classes],
        num_channels=data.num_channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
    )
