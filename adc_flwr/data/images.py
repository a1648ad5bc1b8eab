"""Encoded images (PNG, JPEG, ...) to uint8 arrays, decoded lazily, row by row.

A hub/parquet/imagefolder split stays an Arrow table of undecoded images: a client decodes
the rows of its partition as it uses them and never the test split, instead of every Ray
actor decoding both whole splits before it can answer its first message.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adc_flwr.data.splits import DataError

# Larger images are shrunk to this side at load time: the models here are small ViTs that
# resize anyway, and keeping 500×375 photos would cost gigabytes per Ray actor.
MAX_IMAGE_SIDE = 224
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
# Rows per Arrow read in the header pass: bounds the encoded bytes held at once.
_HEADER_BATCH = 4096


@dataclass(frozen=True)
class DecodePlan:
    """The one colour mode ("L" or "RGB") and square side of every image of a dataset."""

    mode: str
    side: int

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


def image_table(ds: Any, column: str) -> Any:
    """``ds`` reduced to its ``column`` of undecoded images, read as Arrow (no PIL objects)."""
    import datasets

    return (
        ds.cast_column(column, datasets.Image(decode=False))
        .select_columns([column])
        .with_format("arrow")
    )


def plan_decoding(tables: Sequence[Any], what: str) -> DecodePlan:
    """Colour mode and side for all splits at once, from the image headers only.

    PIL opens lazily, so this reads headers, not pixels (~30 µs a PNG, against ~4 ms to
    decode and resize a 500×375 JPEG).

    - colour: grayscale ("L") when every image is single-channel, else RGB (alpha dropped).
    - size: images that all share one square size keep it. Otherwise the side is the most
      common ``min(w, h)`` (the smaller one on ties), and :class:`LazyImages` centre-crops
      every image to a square and resizes it (bilinear, ``PIL.ImageOps.fit``). Sides above
      ``MAX_IMAGE_SIDE`` are shrunk to it.
    """
    modes: set[str] = set()
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    for part, table in enumerate(tables):
        for start in range(0, len(table), _HEADER_BATCH):
            for row, item in enumerate(_items(table, slice(start, start + _HEADER_BATCH)), start):
                try:
                    with open_image(item) as im:
                        modes.add(im.mode)
                        sizes[im.size] += 1
                except (OSError, ValueError) as exc:  # PIL: unknown or unreadable files
                    raise unreadable(what, item, row, part, exc) from exc
    if not sizes:
        raise DataError(f"{what} holds no images.")
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    if len(sizes) == 1:
        ((width, height),) = sizes
        if width == height <= MAX_IMAGE_SIDE:
            return DecodePlan(mode, width)
    sides: collections.Counter[int] = collections.Counter()
    for (w, h), count in sizes.items():
        sides[min(w, h)] += count
    best = max(sides.values())
    return DecodePlan(mode, min(min(s for s, n in sides.items() if n == best), MAX_IMAGE_SIDE))


class LazyImages:
    """The (N, C, S, S) uint8 images of one split, decoded on first use and then kept.

    Index it like the first axis of an array: ``images[idx]`` with an int array, a slice or
    an int, optionally followed by indices into (C, H, W). Each row is decoded on its own
    with the dataset's :class:`DecodePlan`, so the result is the same whichever rows were
    asked for before or together. Decoded rows are kept (read-only), so a process holds the
    rows it used, not the split.
    """

    def __init__(self, table: Any, rows: np.ndarray, plan: DecodePlan, what: str) -> None:
        """``rows``: this split's rows of ``table`` (an :func:`image_table`), in order."""
        self._table = table
        self._rows = np.asarray(rows, dtype=np.int64)
        self._positions = np.arange(self._rows.size)
        self._plan = plan
        self._what = what
        self._kept: dict[int, np.ndarray] = {}
        self.shape = (int(self._rows.size), plan.channels, plan.side, plan.side)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def subset(self, positions: np.ndarray) -> LazyImages:
        """The images at ``positions`` of this split, as a split of their own (a label
        subset): same table and decoding, nothing decoded yet."""
        return LazyImages(self._table, self._rows[positions], self._plan, self._what)

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        picked = np.asarray(self._positions[rows])
        if picked.ndim == 0:
            return self._gather(picked.reshape(1))[0][rest]
        return self._gather(picked)[(slice(None), *rest)]

    def _gather(self, positions: np.ndarray) -> np.ndarray:
        wanted = positions.tolist()
        missing = [p for p in dict.fromkeys(wanted) if p not in self._kept]
        if missing:
            block = self.decode(np.asarray(missing, dtype=np.int64))
            block.setflags(write=False)
            self._kept.update(zip(missing, block, strict=True))
        if not wanted:
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return np.stack([self._kept[p] for p in wanted])

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """Decode ``rows`` of this split without keeping them (for one-off passes: stats)."""
        p = self._plan
        out = np.empty((len(rows), p.side, p.side, p.channels), dtype=np.uint8)
        if len(rows):
            table_rows = self._rows[rows].tolist()
            for i, item in enumerate(_items(self._table, table_rows)):
                try:
                    out[i] = _decode(item, p)
                except (OSError, ValueError) as exc:  # PIL: truncated or unknown files
                    raise unreadable(self._what, item, table_rows[i], None, exc) from exc
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _decode(item: dict[str, Any], plan: DecodePlan) -> np.ndarray:
    """One image as (side, side, channels); PIL replicates grayscale when the plan is RGB."""
    from PIL import Image, ImageOps

    with open_image(item) as im:
        img = im.convert(plan.mode)
        if img.size != (plan.side, plan.side):
            img = ImageOps.fit(img, (plan.side, plan.side), method=Image.Resampling.BILINEAR)
        arr = np.asarray(img)
    return arr.reshape(plan.side, plan.side, plan.channels)


def _items(table: Any, key: slice | list[int]) -> list[dict[str, Any]]:
    """The undecoded images (``{"bytes", "path"}``) of ``key``'s rows, in one Arrow read."""
    return table[key].column(0).to_pylist()


def unreadable(
    what: str, item: dict[str, Any], row: int, part: int | None, exc: Exception
) -> DataError:
    """An image that cannot be read, named by its file (or row) and PIL's reason."""
    where = f"file {item['path']}" if item.get("path") else f"row {row}"
    split = "" if part is None else f" of split {part}"
    return DataError(f"{what}: the image in {where}{split} cannot be read: {exc}")


def open_image(item: dict[str, Any]) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"])


def numeric_images(arr: np.ndarray, what: str) -> np.ndarray:
    """Array columns: (N,H,W), (N,H,W,C) or (N,C,H,W), uint8 or floats in [0, 1]."""
    if arr.dtype.kind not in "biuf":  # strings, structs, ragged lists: not pixel arrays
        first = arr.reshape(-1)[0] if arr.size else None
        first = first.item() if isinstance(first, np.generic) else first  # np.str_ -> str
        raise DataError(
            f"{what}: the image column holds {type(first).__name__} values (row 0: "
            f"{str(first)[:60]!r}), not images: store images as an Image feature (encoded "
            "bytes or paths) or as numeric arrays of one square size"
        )
    if arr.dtype.kind == "f":
        scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
        arr = np.rint(np.clip(arr * scale, 0.0, 255.0))
    arr = arr.astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[2] != arr.shape[3]:
        raise DataError(
            f"{what}: array images of shape {arr.shape[1:]} are not square (N, C, H, W) or "
            "(N, H, W[, C]); store them as an Image feature to get resizing."
        )
    return np.ascontiguousarray(arr)
