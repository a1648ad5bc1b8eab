"""Damaged data is named before anything expensive starts: the file or row and what is wrong,
never "not found" for files that are there, never garbage trained silently."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest

from adc_flwr.data import DataError, load_data
from adc_flwr.data.hf_datasets import SkippedFilesWarning

IMAGES, LABELS = "images", "labels"
STEMS = {
    ("train", IMAGES): "train-images-idx3-ubyte",
    ("train", LABELS): "train-labels-idx1-ubyte",
    ("test", IMAGES): "t10k-images-idx3-ubyte",
    ("test", LABELS): "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000080<ndim>, big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, spoil: dict[tuple[str, str], bytes] | None = None) -> Path:
    """A small, valid Fashion-MNIST folder (40 train, 10 test images); ``spoil`` replaces
    the bytes of some of its files."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 40), ("test", 10)):
        files = {
            IMAGES: idx_bytes(rng.integers(0, 256, (n, 28, 28))),
            LABELS: idx_bytes(np.arange(n) % 10),
        }
        for kind, data in files.items():
            data = (spoil or {}).get((split, kind), data)
            (folder / STEMS[(split, kind)]).write_bytes(data)
    return folder


def test_valid_idx_files_load(tmp_path: Path) -> None:
    bundle = load_data("fashion-mnist", str(write_idx(tmp_path / "ok")))
    assert bundle.train.images.shape == (40, 1, 28, 28) and len(bundle.test) == 10


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (
            {("train", IMAGES): idx_bytes(np.zeros((40, 28, 28)))[:-100]},
            r"train-images-idx3-ubyte is damaged: its header promises \(40, 28, 28\) = 31360 "
            r"bytes of data, it holds 31260",
        ),
        (
            {("test", LABELS): b"\x00\x00\x0d\x01" + struct.pack(">I", 10) + bytes(10)},
            r"t10k-labels-idx1-ubyte is damaged: its magic number is 00000d01, not 00000801",
        ),
        (
            {("train", LABELS): idx_bytes(np.arange(39) % 10)},
            r"train-images-idx3-ubyte holds 40 images but \S+train-labels-idx1-ubyte 39 labels",
        ),
        (
            {("test", LABELS): idx_bytes(np.array([0, 1, 2, 3, 200, 5, 6, 7, 8, 9]))},
            r"the test split holds 1 label\(s\) outside 0\.\.9 \(the 10 classes\), first at "
            r"row 4: 200",
        ),
    ],
    ids=["truncated", "bad-magic", "count-mismatch", "test-label-out-of-range"],
)
def test_damaged_idx_files_are_named_with_what_is_wrong(
    tmp_path: Path, spoil: dict, message: str
) -> None:
    folder = write_idx(tmp_path / "idx", spoil)
    with pytest.raises(DataError, match=message) as caught:
        load_data("fashion-mnist", str(folder))
    assert "not found" not in str(caught.value)


def test_gzip_garbage_is_damaged_not_missing(tmp_path: Path) -> None:
    folder = write_idx(tmp_path / "gz")
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip at all")
    with pytest.raises(
        DataError, match=r"train-images-idx3-ubyte\.gz is damaged: it cannot be read"
    ):
        load_data("fashion-mnist", str(folder))
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
        f.write(idx_bytes(np.zeros((40, 28, 28))))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(buffer.getvalue()[:-40])  # cut short
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is damaged"):
        load_data("fashion-mnist", str(folder) + "/")  # another cache key: read again


def write_parquet(
    folder: Path, train_labels: list, label_feature: object, test_labels: list | None = None
) -> str:
    """train.parquet and test.parquet of solid 8-px images, ``train_labels`` in train (and
    ``test_labels`` in test, 0, 1, 2, 0 unless given)."""
    import datasets
    from PIL import Image

    features = datasets.Features({"img": datasets.Image(), "label": label_feature})
    folder.mkdir(parents=True, exist_ok=True)
    for name, values in (("train", train_labels), ("test", test_labels or [0, 1, 2, 0])):
        images = [
            Image.fromarray(np.full((8, 8, 3), 40 * i % 256, np.uint8)) for i in range(len(values))
        ]
        datasets.Dataset.from_dict({"img": images, "label": values}, features=features).to_parquet(
            str(folder / f"{name}.parquet")
        )
    return f"parquet:{folder}"


@pytest.mark.parametrize(
    ("labels", "class_label", "message"),
    [
        ([0, 1, None, 2, 0, 1], False, r"column 'label' has no label in row 2 of split 0 \(None\)"),
        ([0, 1, float("nan"), 2, 0, 1], False, r"column 'label' has no label in row 2 of split 0"),
        ([0, 1, 2.5, 2, 0, 1], False, r"column 'label' holds 2\.5 in row 2 of split 0"),
        ([0, 1, 7, 2, 0, 1], True, r"column 'label' holds label 7 in row 2 of split 0, outside"),
    ],
    ids=["null", "nan", "fraction", "past-the-classes"],
)
def test_bad_parquet_labels_name_the_row(
    tmp_path: Path, labels: list, class_label: bool, message: str
) -> None:
    import datasets

    if class_label:  # ClassLabel refuses 7 when it is written: store the int as it is read
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = datasets.ClassLabel(names=["a", "b", "c"])
        dataset = write_parquet(tmp_path / "p", [0, 1, 2, 2, 0, 1], names)
        table = pq.read_table(tmp_path / "p" / "train.parquet")
        column = pa.array(labels, type=table.schema.field("label").type)
        pq.write_table(
            table.set_column(table.schema.get_field_index("label"), "label", column),
            tmp_path / "p" / "train.parquet",
        )
    else:
        dataset = write_parquet(tmp_path / "p", labels, datasets.Value("float64"))
    with pytest.raises(DataError, match=message):
        load_data(dataset)


def test_a_string_image_column_names_its_values(tmp_path: Path) -> None:
    import datasets

    folder = tmp_path / "s"
    folder.mkdir()
    for name in ("train", "test"):
        datasets.Dataset.from_dict({"img": ["not an image"] * 4, "label": [0, 1, 0, 1]}).to_parquet(
            str(folder / f"{name}.parquet")
        )
    with pytest.raises(
        DataError,
        match=r"column 'img': the image column holds str values \(row 0: 'not an image'\)",
    ):
        load_data(f"parquet:{folder}")


def test_an_imagefolder_names_what_it_skips_and_what_it_cannot_read(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (folder / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(
                    folder / split / cls / f"{i}.png"
                )
    (folder / "train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.warns(SkippedFilesWarning, match=r"1 file\(s\) are not images .*notes\.txt"):
        load_data(f"imagefolder:{folder}")
    (folder / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with (
        pytest.raises(DataError, match=r"the image in file \S*broken\.png of split 0 cannot be"),
        pytest.warns(SkippedFilesWarning),
    ):
        load_data(f"imagefolder:{folder}/")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            [0, 1, 2, 1000, 0, 1],
            r"column 'label' holds label 1000 in row 3 of split 0, so its integer labels would "
            r"make 1001 classes 0\.\.1000 of which 997 hold no sample \(at most 100",
        ),
        ([0, 1, 2, 10**12, 0, 1], r"column 'label' holds label 1000000000000 in row 3"),
        (
            [0, 1, 10**30, 2, 0, 1],
            r"column 'label' holds label 1e\+30 in row 2 of split 0, past 64-bit",
        ),
        ([0, 0, 0, 0, 0, 0], r"column 'label' gives 1 class\(es\) \['0'\]: a classifier needs"),
    ],
    ids=["1000", "1e12", "past-int64", "one-class"],
)
def test_a_label_value_never_sizes_the_classes(tmp_path: Path, labels: list, message: str) -> None:
    """Issue 27: plain integer labels give classes 0..max only when those ids are mostly
    used; a stray large id is named, before anything of its size is made."""
    import datasets

    feature = datasets.Value("float64" if max(labels) > 2**63 else "int64")
    one_class = [0, 0] if max(labels) == 0 else None  # the default test split holds 1 and 2
    dataset = write_parquet(tmp_path / "p", labels, feature, test_labels=one_class)
    with pytest.raises(DataError, match=message):
        load_data(dataset)


def test_declared_classes_and_a_missing_one_are_kept(tmp_path: Path) -> None:
    """A ClassLabel's classes count even when unused; plain ids may miss one class of ten."""
    import datasets

    declared = write_parquet(tmp_path / "c", [0, 1, 2, 2], datasets.ClassLabel(num_classes=40))
    assert load_data(declared).num_classes == 40
    nine_of_ten = [i for i in range(10) if i != 7]
    ids = write_parquet(tmp_path / "i", nine_of_ten, datasets.Value("int64"))
    assert load_data(ids).num_classes == 10


def test_a_one_class_imagefolder_says_so(tmp_path: Path) -> None:
    """Issue 27: ``datasets`` labels an image folder by its folders only when there are two
    or more; one class folder is named, not "Cannot find the label column"."""
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((8, 8), 60 * i, np.uint8)).save(folder / "cat" / f"{i}.png")
    with pytest.raises(
        DataError, match=rf"all of one class \(folder {folder / 'cat'}\): a classifier needs at"
    ):
        load_data(f"imagefolder:{folder}")
