"""Real-data loaders: formats round-trip on generated fixtures, files are verified,
missing and corrupt files give the promised errors, and the shared data loads."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import metaprior.data as mdata
from metaprior.data import omniglot as omniglot_module
from metaprior.data import store
from metaprior.data.idx import encode_idx, parse_idx

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures


def _register(monkeypatch, root: Path, relpath: str) -> store.FileRecord:
    """Record the content digest of a generated file, as KNOWN_FILES does for releases."""
    path = root / relpath
    if relpath.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            content = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    else:
        content = gzip.decompress(path.read_bytes())
    size, sha = store.content_digest(content)
    record = store.FileRecord("https://example.org/" + relpath, "https://example.org/release", size, sha)
    monkeypatch.setitem(store.KNOWN_FILES, relpath, record)
    return record


def _character_png(key: str, drawer: int, *, left_ink: bool = False) -> bytes:
    """A 105x105 1-bit PNG like Omniglot's: black ink (0) on white (1), drawn from a
    seed derived from (character, drawer) so that shared characters are identical."""
    im = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(im)
    if left_ink:
        draw.rectangle([0, 0, 44, 104], fill=0)
    else:
        rng = np.random.default_rng(zlib.crc32(f"{key}:{drawer}".encode()))
        x0, y0 = rng.integers(5, 60, size=2)
        draw.rectangle([int(x0), int(y0), int(x0) + 30, int(y0) + 12], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_omniglot_zip(path: Path, set_name: str, characters: dict[str, int], drawings: int = 20):
    """``characters``: alphabet -> number of characters (character01..)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{set_name}/", b"")
        for alphabet, n in characters.items():
            for c in range(1, n + 1):
                key = f"{alphabet}/character{c:02d}"
                for d in range(1, drawings + 1):
                    zf.writestr(
                        f"{set_name}/{key}/{1000 + c:04d}_{d:02d}.png",
                        _character_png(key, d, left_ink=alphabet == "Left"),
                    )


SMALL1 = {"Alpha": 3, "Greek": 2, "Left": 1}
SMALL2 = {"Greek": 2, "Beta": 4, "Gamma": 2}  # Greek is in both: 3 + 2 + 1 + 4 + 2 = 12 classes


@pytest.fixture
def omniglot_dir(tmp_path, monkeypatch) -> Path:
    """A data directory with two generated Omniglot set zips in the release layout."""
    root = tmp_path / "data"
    _write_omniglot_zip(root / "omniglot/images_background_small1.zip", "images_background_small1", SMALL1)
    _write_omniglot_zip(root / "omniglot/images_background_small2.zip", "images_background_small2", SMALL2)
    for s in ("small1", "small2"):
        _register(monkeypatch, root, f"omniglot/images_background_{s}.zip")
    return root


def _write_idx_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        data = encode_idx(array)
        if gz:
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(data))
        else:
            (folder / f"{prefix}-{kind}-ubyte").write_bytes(data)


def _idx_arrays(n: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


# ----------------------------------------------------------------------------- store


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPRIOR_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mdata.data_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    assert mdata.data_dir() == (tmp_path / "env").resolve()
    monkeypatch.delenv("METAPRIOR_DATA")
    assert mdata.data_dir() == (tmp_path / "xdg" / "metaprior").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mdata.data_dir() == (tmp_path / "home" / ".cache" / "metaprior").resolve()


def test_cache_dir_resolution_is_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("METAPRIOR_CACHE", str(tmp_path / "c"))
    assert mdata.cache_dir() == (tmp_path / "c").resolve()
    assert mdata.cache_dir(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv("METAPRIOR_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    default = mdata.cache_dir()
    assert REPO not in default.parents and default.parts[-2:] == ("metaprior", "decoded")


def test_missing_file_error_names_file_path_and_release(tmp_path):
    with pytest.raises(mdata.MissingDataError) as err:
        mdata.load_mnist("test", data_dir=tmp_path)
    message = str(err.value)
    expected = tmp_path.resolve() / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert "'t10k-images-idx3-ubyte.gz'" in message
    assert str(expected) in message
    assert store.KNOWN_FILES["mnist/t10k-images-idx3-ubyte.gz"].release in message
    assert isinstance(err.value, FileNotFoundError)


def test_missing_omniglot_set_error(tmp_path):
    with pytest.raises(mdata.MissingDataError, match="images_background_small1.zip") as err:
        mdata.load_omniglot(data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert "github.com/brendenlake/omniglot" in str(err.value)


def test_truncated_gzip_is_corrupt(tmp_path):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels)
    path = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(mdata.CorruptDataError) as err:
        mdata.load_fashion_mnist("test", data_dir=tmp_path)
    assert str(path.resolve()) in str(err.value)
    assert "github.com/zalandoresearch/fashion-mnist" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_checksum_mismatch_is_corrupt(tmp_path, monkeypatch):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels)
    for kind in ("images-idx3", "labels-idx1"):
        _register(monkeypatch, tmp_path, f"fashion-mnist/t10k-{kind}-ubyte.gz")
    x, y = mdata.load_fashion_mnist("test", data_dir=tmp_path)  # verifies
    np.testing.assert_array_equal(y, labels)
    labels[0] = (labels[0] + 1) % 10  # same size, different content
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels)
    with pytest.raises(mdata.CorruptDataError, match="content sha256"):
        mdata.load_fashion_mnist("test", data_dir=tmp_path)


def test_recorded_size_is_checked_without_a_checksum(tmp_path):
    # Fashion-MNIST's records hold the release sizes only: 50 images is not 10,000.
    assert store.KNOWN_FILES["fashion-mnist/t10k-images-idx3-ubyte.gz"].sha256 is None
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels)
    with pytest.raises(mdata.CorruptDataError, match="decompressed size 39216 bytes, expected 7840016"):
        mdata.load_fashion_mnist("test", data_dir=tmp_path)


def test_download_is_verified_before_it_lands(tmp_path, monkeypatch):
    source = tmp_path / "mirror"
    images, labels = _idx_arrays()
    _write_idx_pair(source / "fashion-mnist", "t10k", images, labels)
    relpath = "fashion-mnist/t10k-labels-idx1-ubyte.gz"
    _register(monkeypatch, source, relpath)
    url = (source / relpath).as_uri()
    dest = mdata.download(relpath, tmp_path / "data", url=url)
    assert dest == (tmp_path / "data" / relpath).resolve()
    assert dest.read_bytes() == (source / relpath).read_bytes()
    # A download that fails verification is deleted, not left in place.
    (source / relpath).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 8))
    with pytest.raises(mdata.CorruptDataError):
        mdata.download(relpath, tmp_path / "other", url=url)
    assert not (tmp_path / "other" / relpath).exists()
    assert list((tmp_path / "other" / "fashion-mnist").iterdir()) == []


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    back = parse_idx(encode_idx(array))
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)


def test_idx_header_mismatch_is_corrupt():
    data = encode_idx(np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(mdata.CorruptDataError, match="header says shape"):
        parse_idx(data[:-1])
    with pytest.raises(mdata.CorruptDataError, match="magic"):
        parse_idx(b"\x01" + data[1:])


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_round_trip(tmp_path, gz):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path, "train", images, labels, gz=gz)
    suffix = ".gz" if gz else ""
    x, y = mdata.load_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert x.dtype == np.uint8 and y.dtype == np.int32
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)


def test_load_idx_count_mismatch(tmp_path):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path, "train", images, labels[:-1])
    with pytest.raises(mdata.CorruptDataError, match="50 images but 49 labels"):
        mdata.load_idx(tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz")
    with pytest.raises(mdata.MissingDataError):
        mdata.load_idx(tmp_path / "nope.gz", tmp_path / "train-labels-idx1-ubyte.gz")


@pytest.mark.parametrize(
    "loader,folder",
    [(mdata.load_mnist, "mnist"), (mdata.load_notmnist, "notmnist"), (mdata.load_fashion_mnist, "fashion-mnist")],
)
def test_mnist_style_loaders_scale_and_shape(tmp_path, monkeypatch, loader, folder):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path / folder, "train", images, labels)
    for kind in ("images-idx3", "labels-idx1"):
        _register(monkeypatch, tmp_path, f"{folder}/train-{kind}-ubyte.gz")
    x, y = loader("train", data_dir=tmp_path)
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_allclose(x[..., 0] * 255.0, images, atol=1e-4)
    np.testing.assert_array_equal(y, labels)
    with pytest.raises(ValueError, match="split"):
        loader("validation", data_dir=tmp_path)


def test_decompressed_copy_is_accepted_and_verified(tmp_path, monkeypatch):
    images, labels = _idx_arrays()
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels)
    for kind in ("images-idx3", "labels-idx1"):
        _register(monkeypatch, tmp_path, f"fashion-mnist/t10k-{kind}-ubyte.gz")
    _write_idx_pair(tmp_path / "fashion-mnist", "t10k", images, labels, gz=False)
    for kind in ("images-idx3", "labels-idx1"):
        (tmp_path / f"fashion-mnist/t10k-{kind}-ubyte.gz").unlink()
    x, y = mdata.load_fashion_mnist("test", data_dir=tmp_path)
    np.testing.assert_array_equal(y, labels)


# ----------------------------------------------------------------------------- class arrays


def test_as_class_array_truncates_to_the_smallest_class():
    labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 0])
    images = np.arange(len(labels))[:, None] * 1.0
    ds = mdata.as_class_array(images, labels)
    assert ds.images.shape == (3, 2, 1)
    # first examples of each class, in order of appearance
    np.testing.assert_array_equal(ds.images[..., 0], [[1, 3], [2, 6], [0, 4]])
    assert ds.class_names == ("0", "1", "2") == ds.groups
    assert mdata.as_class_array(images, labels, 1, class_names=("a", "b", "c")).class_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="fewer examples"):
        mdata.as_class_array(images, labels, num_per_class=3)


def _toy_dataset(groups=("a", "a", "b", "c", "c", "c", "d", "e", "f", "g")) -> mdata.FewShotDataset:
    n = len(groups)
    images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None, None], (n, 3, 4, 4, 1)).copy()
    return mdata.FewShotDataset(images, tuple(f"{g}/c{i}" for i, g in enumerate(groups)), tuple(groups))


def test_split_by_group_is_disjoint_and_complete():
    ds = _toy_dataset()
    splits = mdata.split_by_group(ds, (0.6, 0.2, 0.2), seed=3)
    assert set(splits) == {"train", "val", "test"}
    names = [set(s.class_names) for s in splits.values()]
    groups = [set(s.groups) for s in splits.values()]
    assert all(not (a & b) for i, a in enumerate(names) for b in names[i + 1 :])
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    assert set().union(*names) == set(ds.class_names)
    # 10 classes in groups of 2, 1, 3, 1, 1, 1, 1: targets 6 / 2 / 2 classes, met
    # as closely as whole groups allow (within the largest group, 3)
    sizes = [s.num_classes for s in splits.values()]
    assert all(abs(n - t) < 3 for n, t in zip(sizes, (6, 2, 2))), sizes
    for split in splits.values():  # images travel with their names
        for img, name in zip(split.images, split.class_names):
            assert img[0, 0, 0, 0] == ds.class_names.index(name)
    # a fixed seed is a fixed split; the seed matters
    again = mdata.split_by_group(ds, (0.6, 0.2, 0.2), seed=3)
    assert all(again[k].class_names == splits[k].class_names for k in splits)
    others = {tuple(mdata.split_by_group(ds, seed=s)["test"].groups) for s in range(10)}
    assert len(others) > 1


def test_mix_held_out_shares_groups_between_val_and_test():
    groups = ("t",) * 6 + ("v",) * 4 + ("x",) * 6 + ("y",) * 2
    ds = _toy_dataset(groups)
    by_group = {"train": ds.select(range(6)), "val": ds.select(range(6, 10)), "test": ds.select(range(10, 18))}
    mixed = mdata.mix_held_out(by_group, seed=0)
    assert mixed["train"] is by_group["train"]
    val, test = set(mixed["val"].class_names), set(mixed["test"].class_names)
    assert not (val & test) and val | test == set(ds.class_names[6:])  # disjoint, nothing lost
    # every held-out group is dealt 1/3 : 2/3 (the old val : test sizes), rounded
    for g, n in (("v", 4), ("x", 6), ("y", 2)):
        assert mixed["val"].groups.count(g) == round(n / 3) and mixed["test"].groups.count(g) == n - round(n / 3)
    for split in mixed.values():  # images travel with their names
        for img, name in zip(split.images, split.class_names):
            assert img[0, 0, 0, 0] == ds.class_names.index(name)
    assert mdata.mix_held_out(by_group, seed=0)["val"].class_names == mixed["val"].class_names
    assert {mdata.mix_held_out(by_group, seed=s)["val"].class_names for s in range(10)} != {mixed["val"].class_names}
    with pytest.raises(ValueError, match="val and test"):
        mdata.mix_held_out({**by_group, "val": ds.select([])})


def test_split_gives_every_positive_fraction_a_group():
    splits = mdata.split_by_group(_toy_dataset(("a", "b", "c")), (0.9, 0.05, 0.05))
    assert [s.num_classes for s in splits.values()] == [1, 1, 1]
    splits = mdata.split_by_group(_toy_dataset(("a", "b", "c")), (1.0, 0.0, 0.0))
    assert [s.num_classes for s in splits.values()] == [3, 0, 0]


def test_with_rotations():
    rng = np.random.default_rng(0)
    ds = mdata.FewShotDataset(rng.random((2, 3, 5, 5, 1), dtype=np.float32), ("A/x", "B/y"), ("A", "B"))
    rot = mdata.with_rotations(ds)
    assert rot.images.shape == (8, 3, 5, 5, 1)
    np.testing.assert_array_equal(rot.images[:2], ds.images)
    np.testing.assert_array_equal(rot.images[2, 1, :, :, 0], np.rot90(ds.images[0, 1, :, :, 0]))
    np.testing.assert_array_equal(rot.images[5, 2, :, :, 0], np.rot90(ds.images[1, 2, :, :, 0], 2))
    assert rot.class_names[:3] == ("A/x", "B/y", "A/x/rot090") and rot.class_names[-1] == "B/y/rot270"
    assert rot.groups == ("A", "B") * 4
    assert len(set(rot.class_names)) == 8
    with pytest.raises(ValueError, match="square"):
        mdata.with_rotations(mdata.FewShotDataset(np.zeros((1, 1, 2, 3, 1)), ("a",), ("a",)))


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_round_trip(omniglot_dir, tmp_path):
    ds = mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=tmp_path / "cache")
    assert ds.images.shape == (12, 20, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.class_names == tuple(sorted(ds.class_names)) and len(set(ds.class_names)) == 12
    assert ds.class_names.count("Greek/character01") == 1  # shared characters are one class
    assert set(ds.groups) == {"Alpha", "Greek", "Left", "Beta", "Gamma"}
    assert all(n.split("/")[0] == g for n, g in zip(ds.class_names, ds.groups))
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    # ink is 1, background 0: "Left" has ink on its left 45 of 105 columns (12 of 28).
    left = ds.images[ds.class_names.index("Left/character01")]
    assert left[:, :, :10].min() > 0.99 and left[:, :, 14:].max() < 0.01
    # drawings are distinct images in drawer order
    assert not np.array_equal(ds.images[0, 0], ds.images[0, 1])
    raw = ds.images[ds.class_names.index("Alpha/character02"), 4]
    expected = omniglot_module.decode_omniglot_png(_character_png("Alpha/character02", 5))
    np.testing.assert_array_equal(raw, expected)


def test_omniglot_image_size_and_original(omniglot_dir, tmp_path):
    ds = mdata.load_omniglot(("images_background_small2",), image_size=105, data_dir=omniglot_dir, cache=False)
    assert ds.images.shape == (8, 20, 105, 105, 1)
    assert set(np.unique(ds.images)) <= {0.0, 1.0}  # unresized 1-bit images stay binary
    with pytest.raises(ValueError, match="unknown Omniglot sets"):
        mdata.load_omniglot(("images_background_small3",), data_dir=omniglot_dir)


def test_omniglot_second_load_reads_the_cache(omniglot_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"
    assert not list(omniglot_dir.rglob("*.npz"))  # nothing written into the data directory

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(omniglot_module, "_decode_sets", no_decoding)
    second = mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.class_names == first.class_names and second.groups == first.groups
    # another size is another cache entry
    with pytest.raises(AssertionError, match="decoded again"):
        mdata.load_omniglot(image_size=20, data_dir=omniglot_dir, cache_dir=cache)


def test_omniglot_unreadable_cache_is_rebuilt(omniglot_dir, tmp_path):
    cache = tmp_path / "cache"
    first = mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)
    (cached,) = cache.iterdir()
    cached.write_bytes(cached.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="unreadable Omniglot cache"):
        again = mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)
    np.testing.assert_array_equal(again.images, first.images)


def test_corrupt_omniglot_zip_is_never_used(omniglot_dir, tmp_path):
    cache = tmp_path / "cache"
    mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)  # a cache entry exists
    path = omniglot_dir / "omniglot/images_background_small2.zip"
    # Replace one drawing by another valid PNG: the zip is well formed, the content is not the release's.
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    name = next(n for n in members if n.endswith(".png"))
    members[name] = _character_png("something else", 1)
    with zipfile.ZipFile(path, "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    with pytest.raises(mdata.CorruptDataError, match="images_background_small2.zip") as err:
        mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)
    assert "content sha256" in str(err.value) and "https://example.org/release" in str(err.value)
    # Damaged bytes inside a member fail the zip's own CRC check.
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 40
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mdata.CorruptDataError, match="corrupt"):
        mdata.load_omniglot(data_dir=omniglot_dir, cache_dir=cache)


def test_omniglot_splits(omniglot_dir, tmp_path):
    splits = mdata.omniglot_splits(data_dir=omniglot_dir, cache_dir=tmp_path / "c", seed=1)
    plain = mdata.omniglot_splits(rotations=False, data_dir=omniglot_dir, cache_dir=tmp_path / "c", seed=1)
    assert splits["train"].num_classes == 4 * plain["train"].num_classes
    np.testing.assert_array_equal(splits["train"].images[: plain["train"].num_classes], plain["train"].images)
    for name in ("val", "test"):  # evaluation splits are not rotated
        assert splits[name].class_names == plain[name].class_names
    assert sum(s.num_classes for s in plain.values()) == 12
    groups = [set(s.groups) for s in splits.values()]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])


# ----------------------------------------------------------------------------- one-shot runs


def _stripe_png(j: int, shift: int) -> bytes:
    """Class ``j`` of 20: a black square at grid cell ``j`` (5 x 4 grid), shifted."""
    im = Image.new("1", (105, 105), 1)
    r, c = divmod(j, 5)
    x, y = 21 * c + 2 + shift, 26 * r + 2 + shift
    ImageDraw.Draw(im).rectangle([x, y, x + 15, y + 18], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _write_runs(root: Path, num_runs: int = 2, short_paths: bool = False) -> list[np.ndarray]:
    """The original layout: runNN/{training/classNN.png, test/itemNN.png, class_labels.txt}.
    Returns each run's answer key (the 0-based training class of each test item)."""
    answers = []
    for r in range(1, num_runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        perm = np.random.default_rng(r).permutation(20)  # test item i shows class perm[i]
        lines = []
        for j in range(20):
            (run / "training" / f"class{j + 1:02d}.png").write_bytes(_stripe_png(j, 0))
        for i in range(20):
            (run / "test" / f"item{i + 1:02d}.png").write_bytes(_stripe_png(int(perm[i]), 2))
            prefix = "" if short_paths else f"run{r:02d}/"
            lines.append(f"{prefix}test/item{i + 1:02d}.png {prefix}training/class{perm[i] + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")
        answers.append(perm.astype(np.int32))
    return answers


def _nearest_neighbour(run) -> np.ndarray:
    d = ((run.query_x[:, None] - run.support_x[None]) ** 2).sum(axis=(2, 3, 4))
    return d.argmin(axis=1)


@pytest.mark.parametrize("short_paths", [False, True])
def test_oneshot_runs_round_trip_and_score(tmp_path, short_paths):
    answers = _write_runs(tmp_path / "all_runs", short_paths=short_paths)
    runs = mdata.load_oneshot_runs(tmp_path / "all_runs")
    assert [r.name for r in runs] == ["run01", "run02"]
    for run, answer in zip(runs, answers):
        assert run.support_x.shape == (20, 28, 28, 1) and run.query_x.shape == (20, 28, 28, 1)
        np.testing.assert_array_equal(run.support_y, np.arange(20))
        np.testing.assert_array_equal(run.query_y, answer)
        assert run.support_files[0] == "training/class01.png" and run.query_files[-1] == "test/item20.png"
    predictions = [_nearest_neighbour(r) for r in runs]
    assert mdata.score_oneshot_runs(predictions, runs) == 0.0
    wrong = [p.copy() for p in predictions]
    wrong[0][:5] = (wrong[0][:5] + 1) % 20  # 5 of 20 wrong in run 1, none in run 2
    assert mdata.score_oneshot_runs(wrong, runs) == pytest.approx((5 / 20 + 0) / 2)
    logits = np.stack([np.eye(20)[p] for p in predictions])
    assert mdata.score_oneshot_runs(logits, runs) == 0.0
    episodes = mdata.oneshot_episodes(runs)
    assert episodes.support_x.shape == (2, 20, 28, 28, 1) and episodes.query_y.shape == (2, 20)
    with pytest.raises(ValueError, match="predictions"):
        mdata.score_oneshot_runs(predictions[:1], runs)


def test_oneshot_runs_from_zip_and_single_run(tmp_path):
    _write_runs(tmp_path / "all_runs")
    from_dir = mdata.load_oneshot_runs(tmp_path / "all_runs")
    shutil.make_archive(str(tmp_path / "all_runs"), "zip", tmp_path, "all_runs")
    from_zip = mdata.load_oneshot_runs(tmp_path / "all_runs.zip")
    assert [r.name for r in from_zip] == ["run01", "run02"]
    for a, b in zip(from_dir, from_zip):
        np.testing.assert_array_equal(a.query_x, b.query_x)
        np.testing.assert_array_equal(a.query_y, b.query_y)
    (single,) = mdata.load_oneshot_runs(tmp_path / "all_runs" / "run02")
    np.testing.assert_array_equal(single.query_y, from_dir[1].query_y)


def test_oneshot_runs_missing_and_broken(tmp_path):
    with pytest.raises(mdata.MissingDataError, match="brendenlake/omniglot"):
        mdata.load_oneshot_runs(tmp_path / "nowhere")
    with pytest.raises(mdata.MissingDataError, match="all_runs.zip"):
        mdata.load_oneshot_runs(data_dir=tmp_path)
    _write_runs(tmp_path / "all_runs", num_runs=1)
    (tmp_path / "all_runs/run01/test/item07.png").unlink()
    with pytest.raises(mdata.CorruptDataError, match="item07"):
        mdata.load_oneshot_runs(tmp_path / "all_runs")


# ----------------------------------------------------------------------------- miniImageNet


def _mini_arrays(num_classes=3, per_class=7, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_classes * per_class, 84, 84, 3), dtype=np.uint8)
    wnids = np.array([f"n0{i}" for i in rng.permutation(num_classes)]).repeat(per_class)
    order = rng.permutation(len(images))
    return images[order], wnids[order]


def test_miniimagenet_npz_round_trip(tmp_path):
    images, wnids = _mini_arrays()
    (tmp_path / "miniimagenet").mkdir()
    np.savez(tmp_path / "miniimagenet/mini-imagenet-val.npz", images=images, labels=wnids)
    ds = mdata.load_miniimagenet("val", tmp_path)
    assert ds.images.shape == (3, 7, 84, 84, 3) and ds.images.dtype == np.float32
    assert ds.class_names == ("n00", "n01", "n02") == ds.groups
    for c, name in enumerate(ds.class_names):
        np.testing.assert_allclose(ds.images[c] * 255.0, images[wnids == name], atol=1e-3)
    raw = mdata.load_miniimagenet("val", tmp_path, dtype=np.uint8, num_per_class=5)
    assert raw.images.dtype == np.uint8 and raw.images.shape == (3, 5, 84, 84, 3)
    # integer labels with class names
    labels = np.searchsorted(np.array(ds.class_names), wnids)
    np.savez(
        tmp_path / "miniimagenet/mini-imagenet-test.npz",
        images=images,
        labels=labels,
        class_names=np.array(ds.class_names),
    )
    again = mdata.load_miniimagenet("test", tmp_path, dtype=np.uint8)
    assert again.class_names == ds.class_names
    np.testing.assert_array_equal(again.images, mdata.load_miniimagenet("val", tmp_path, dtype=np.uint8).images)


def test_miniimagenet_pickle_needs_opt_in(tmp_path):
    images, wnids = _mini_arrays()
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    class_dict = {w: np.flatnonzero(wnids == w).tolist() for w in np.unique(wnids)}
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f)
    with pytest.raises(mdata.MissingDataError, match="allow_pickle=True"):
        mdata.load_miniimagenet("train", tmp_path)
    from_pickle = mdata.load_miniimagenet("train", tmp_path, allow_pickle=True, dtype=np.uint8)
    mdata.convert_miniimagenet_pickle(folder / "mini-imagenet-cache-train.pkl", folder / "mini-imagenet-train.npz")
    from_npz = mdata.load_miniimagenet("train", tmp_path, dtype=np.uint8)
    assert from_npz.class_names == from_pickle.class_names
    np.testing.assert_array_equal(from_npz.images, from_pickle.images)


def test_miniimagenet_missing_and_corrupt(tmp_path):
    with pytest.raises(mdata.MissingDataError, match="mini-imagenet-train.npz"):
        mdata.load_miniimagenet("train", tmp_path)
    (tmp_path / "miniimagenet").mkdir()
    np.savez(
        tmp_path / "miniimagenet/mini-imagenet-train.npz",
        images=np.zeros((2, 84, 84), np.uint8),
        labels=np.zeros(2, np.int64),
    )
    with pytest.raises(mdata.CorruptDataError, match="expected uint8 images"):
        mdata.load_miniimagenet("train", tmp_path)
    (tmp_path / "miniimagenet/mini-imagenet-train.npz").write_bytes(b"not a zip")
    with pytest.raises(mdata.CorruptDataError):
        mdata.load_miniimagenet("train", tmp_path)
    with pytest.raises(ValueError, match="split"):
        mdata.load_miniimagenet("validation", tmp_path)


# ----------------------------------------------------------------------------- shared data

SHARED_FILES = [k for k, r in store.KNOWN_FILES.items() if r.sha256 is not None]


@pytest.mark.data
@pytest.mark.parametrize("relpath", SHARED_FILES)
def test_shared_files_verify(shared_data_dir, relpath):
    assert mdata.verify_file(relpath, shared_data_dir).is_file()


@pytest.mark.data
def test_shared_omniglot_is_242_characters_of_20(shared_data_dir, tmp_path, monkeypatch):
    ds = mdata.load_omniglot(data_dir=shared_data_dir, cache_dir=tmp_path)
    assert ds.images.shape == (242, 20, 28, 28, 1)
    assert len(set(ds.class_names)) == 242
    # small1: 5 alphabets, 136 characters; small2: 5 alphabets, 156; Greek (24) and
    # Latin (26) are in both: 136 + 156 - 50 = 242 characters of 8 alphabets.
    assert len(set(ds.groups)) == 8
    assert ds.groups.count("Greek") == 24 and ds.groups.count("Latin") == 26
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert 0.02 < ds.images.mean() < 0.2  # mostly background (0), some ink (1)
    monkeypatch.setattr(omniglot_module, "_decode_sets", None)  # the second load must not decode
    cached = mdata.load_omniglot(data_dir=shared_data_dir, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached.images, ds.images)
    splits = mdata.omniglot_splits(data_dir=shared_data_dir, cache_dir=tmp_path)
    assert splits["train"].num_classes == 4 * 152  # rotations on for meta-training
    assert (splits["val"].num_classes, splits["test"].num_classes) == (42, 48)  # 20-way possible
    assert set(splits["test"].groups) == {"Early_Aramaic", "Latin"}
    mixed = mdata.omniglot_splits(data_dir=shared_data_dir, cache_dir=tmp_path, held_out="character")
    assert mixed["train"].class_names == splits["train"].class_names
    assert (mixed["val"].num_classes, mixed["test"].num_classes) == (42, 48)
    assert set(mixed["val"].groups) == set(mixed["test"].groups) == {"Sanskrit", "Early_Aramaic", "Latin"}
    with pytest.raises(ValueError, match="held_out"):
        mdata.omniglot_splits(data_dir=shared_data_dir, cache_dir=tmp_path, held_out="drawer")


@pytest.mark.data
def test_shared_mnist_test_set(shared_data_dir):
    x, y = mdata.load_mnist("test", data_dir=shared_data_dir)
    assert x.shape == (10_000, 28, 28, 1) and x.dtype == np.float32
    assert 0.0 == x.min() and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])
    ds = mdata.as_class_array(x, y)
    assert ds.images.shape == (10, 892, 28, 28, 1)


@pytest.mark.data
def test_shared_notmnist_test_set(shared_data_dir):
    x, y = mdata.load_notmnist("test", data_dir=shared_data_dir)
    assert x.shape == (10_000, 28, 28, 1)
    assert 0.0 <= x.min() and x.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(y), [1000] * 10)


@pytest.mark.data
def test_corrupted_copy_of_shared_file_is_reported(shared_data_dir, tmp_path):
    content = bytearray(gzip.decompress((shared_data_dir / "mnist/t10k-labels-idx1-ubyte.gz").read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed: a valid IDX file, not MNIST
    (tmp_path / "mnist").mkdir()
    shutil.copy(shared_data_dir / "mnist/t10k-images-idx3-ubyte.gz", tmp_path / "mnist")
    (tmp_path / "mnist/t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(mdata.CorruptDataError, match="content sha256") as err:
        mdata.load_mnist("test", data_dir=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value) and "yann.lecun.com" in str(err.value)


def test_miniimagenet_pickle_cannot_run_code(tmp_path):
    """A pickle that would call os.system on load is refused by the restricted unpickler
    (the command never runs: its marker file is not created)."""
    import os

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": Evil(), "class_dict": {}}))
    from metaprior.data.miniimagenet import read_miniimagenet_pickle

    with pytest.raises(mdata.CorruptDataError, match="refusing to load global (posix|os).system"):
        read_miniimagenet_pickle(path)
    assert not marker.exists()
