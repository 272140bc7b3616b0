"""Fuzzing the file loaders with hypothesis: random bytes and random truncations of valid
files end in our errors (``DataError`` / ``ValueError`` / ``FileNotFoundError`` with a
message), never in another exception, a hang or an unbounded allocation.

Each property runs 60 examples (``max_examples``) with a 2 s deadline per example; the
seeds are hypothesis's derandomised ones (``derandomize=True``), so a run is
reproducible. Valid inputs are built here (an IDX array, a zip of PNGs in the one-shot
release's layout, a checkpoint) and then cut or overwritten at random offsets.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaprior.data.store import DataError

FUZZ = settings(
    max_examples=60,
    deadline=2000,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OURS = (DataError, ValueError, FileNotFoundError)


def _png(value: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((10, 10), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _runs_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        lines = []
        for i in range(1, 3):
            zf.writestr(f"run01/training/class{i:02d}.png", _png(40 * i))
            zf.writestr(f"run01/test/item{i:02d}.png", _png(40 * i))
            lines.append(f"run01/test/item{i:02d}.png run01/training/class{i:02d}.png")
        zf.writestr("run01/class_labels.txt", "\n".join(lines) + "\n")
    return buf.getvalue()


def _idx_bytes() -> bytes:
    from metaprior.data.idx import encode_idx

    return encode_idx(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))


def _checkpoint_bytes(tmp) -> bytes:
    import jax.numpy as jnp
    import optax

    from metaprior.inference.meta import meta_learner, save_checkpoint

    state = meta_learner(lambda p, k, b: (p["w"] ** 2).sum(), optax.adam(1e-3)).init({"w": jnp.ones(3)})
    save_checkpoint(tmp / "good.ckpt", state)
    return (tmp / "good.ckpt").read_bytes(), state


def _mutate(data: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data[: max(0, min(cut, len(data)))])
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


MUTATION = (st.integers(0, 4096), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8))


@FUZZ
@given(st.binary(max_size=256))
def test_parse_idx_random_bytes(data):
    from metaprior.data.idx import parse_idx

    try:
        parse_idx(data, source="fuzz")
    except OURS as err:
        assert "fuzz" in str(err)


@FUZZ
@given(*MUTATION)
def test_parse_idx_mutated(cut, flips):
    from metaprior.data.idx import parse_idx

    try:
        parse_idx(_mutate(_idx_bytes(), cut, flips), source="fuzz")
    except OURS as err:
        assert "fuzz" in str(err)


def test_parse_idx_huge_header_is_refused_before_allocating():
    """A 10-byte file whose header claims 2^32 x 2^32 bytes: refused from the length check."""
    from metaprior.data.idx import parse_idx

    with pytest.raises(DataError, match="header says shape"):
        parse_idx(b"\0\0\x08\x02\xff\xff\xff\xff\xff\xff\xff\xff", source="fuzz")


@FUZZ
@given(*MUTATION)
def test_oneshot_runs_zip_mutated(tmp_path, cut, flips):
    from metaprior.data.omniglot import load_oneshot_runs

    good = _runs_zip()
    path = tmp_path / "all_runs.zip"
    path.write_bytes(_mutate(good, len(good) - cut, flips))
    try:
        runs = load_oneshot_runs(path, image_size=8)
    except OURS as err:
        assert str(err)
    else:
        assert all(r.support_x.shape[1:] == (8, 8, 1) for r in runs)


@FUZZ
@given(st.binary(max_size=512))
def test_png_decoder_random_bytes(data):
    from metaprior.data.omniglot import decode_omniglot_png

    try:
        decode_omniglot_png(data, image_size=8, source="fuzz.png")
    except OURS as err:
        assert "fuzz.png" in str(err)


@FUZZ
@given(*MUTATION)
def test_checkpoint_mutated(tmp_path, cut, flips):
    """A checkpoint cut or overwritten anywhere is refused with our message, or (when the
    damage missed every array) reads back with the original shapes."""
    from metaprior.inference.meta import load_checkpoint

    good, state = _checkpoint_bytes(tmp_path)
    path = tmp_path / "bad.ckpt"
    path.write_bytes(_mutate(good, len(good) - cut, flips))
    try:
        loaded, _ = load_checkpoint(path, state)
    except OURS as err:
        assert "bad.ckpt" in str(err)
    else:
        import jax

        assert [np.shape(a) for a in jax.tree.leaves(loaded)] == [np.shape(a) for a in jax.tree.leaves(state)]


def test_npz_with_a_huge_declared_array_is_refused(tmp_path):
    """An .npz whose member header claims 10^12 floats (and holds 8 bytes): our error, no
    attempt to allocate 4 TB."""
    from metaprior._io import read_tagged_npz

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (118 - len(header)) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 8
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("leaf_0.npy", member)
    path = tmp_path / "huge.ckpt"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="huge.ckpt"):
        read_tagged_npz(path, "metaprior-checkpoint-v1", label="checkpoint")


def test_zip_bomb_is_refused_before_decompressing(tmp_path):
    """A zip whose member declares more than the loaders' limit is refused from its
    directory entry, before any decompression."""
    from metaprior.data import store

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("run01/class_labels.txt", b"\0" * (store.MAX_ZIP_BYTES // 1000))
    path = tmp_path / "bomb.zip"
    path.write_bytes(buf.getvalue())
    old = store.MAX_ZIP_BYTES
    store.MAX_ZIP_BYTES = 1000  # the test's member is a million times smaller than the real limit
    try:
        from metaprior.data.omniglot import load_oneshot_runs

        with pytest.raises(DataError, match="bomb.zip.*uncompressed"):
            load_oneshot_runs(path)
    finally:
        store.MAX_ZIP_BYTES = old
