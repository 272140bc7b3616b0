"""The deep weight prior's released source kernels: loader, checks, and the prior learned
from them (``source="released"``); the kernel statistics that compare source pipelines."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from metaprior.data import CorruptDataError, MissingDataError
from metaprior.data.dwp_kernels import RELEASED_KERNEL_FILES, load_released_kernels
from metaprior.inference.dwp_source import DWPSettings, gaussian_loglik, learn_prior, neighbour_correlation


def _write_release(root, sizes=((7, 40, 12), (5, 60, None)), seed=0):
    """Generated kernels in the release's layout: ``dwp-kernels/conv{k}x{k}_{split}.npy``,
    float32 ``(n, 1, k, k)``; smooth (blurred) kernels, so neighbouring weights correlate."""
    rng = np.random.default_rng(seed)
    (root / "dwp-kernels").mkdir(parents=True)
    for k, n_a, n_b in sizes:
        for split, n in (("train", n_a), ("test", n_b)) if n_b else (("test", n_a),):
            w = rng.normal(size=(n, 1, k + 2, k + 2))
            w = (w[..., :-2, :-2] + w[..., 1:-1, 1:-1] + w[..., 2:, 2:] + w[..., 1:-1, :-2] + w[..., :-2, 1:-1]) / 5
            np.save(root / "dwp-kernels" / f"conv{k}x{k}_{split}.npy", w.astype(np.float32))


def test_released_kernels_load_with_their_checksums(shared_data_dir):
    if not (shared_data_dir / "dwp-kernels").is_dir():
        pytest.skip("no dwp-kernels/ in the data directory")
    seven, five = load_released_kernels(shared_data_dir)
    assert seven["train"].shape == (1769, 7, 7) and seven["test"].shape == (443, 7, 7)
    assert five["test"].shape == (20448, 5, 5) and "train" not in five
    # what the issue quotes of them: no near-zero kernels in the 5x5 set, structured 7x7 kernels
    norms = np.linalg.norm(five["test"].reshape(len(five["test"]), -1), axis=1)
    assert norms.min() > 0.7 * np.median(norms)
    assert neighbour_correlation(seven["train"]) > 0.6


def test_generated_release_loads_and_bad_files_are_named(tmp_path):
    _write_release(tmp_path)
    # generated files are not the release: their checksums fail, and the message names the file
    with pytest.raises(CorruptDataError, match="conv7x7_train.npy.*failed verification"):
        load_released_kernels(tmp_path)
    seven, five = load_released_kernels(tmp_path, verify=False)
    assert seven["train"].shape == (40, 7, 7) and five["test"].shape == (60, 5, 5)
    with pytest.raises(ValueError, match="kernel_sizes \\[3\\]"):
        load_released_kernels(tmp_path, (3,), verify=False)
    (tmp_path / RELEASED_KERNEL_FILES[5]["test"]).write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(CorruptDataError, match="conv5x5_test.npy"):
        load_released_kernels(tmp_path, verify=False)
    np.save(tmp_path / RELEASED_KERNEL_FILES[5]["test"], np.zeros((4, 5, 5), np.float32))  # no channel axis
    with pytest.raises(CorruptDataError, match="expected float32 kernels"):
        load_released_kernels(tmp_path, verify=False)
    np.save(tmp_path / RELEASED_KERNEL_FILES[5]["test"], np.array([{"a": 1}], dtype=object))
    with pytest.raises(CorruptDataError, match="conv5x5_test.npy"):  # object arrays would need pickle: refused
        load_released_kernels(tmp_path, verify=False)
    (tmp_path / RELEASED_KERNEL_FILES[7]["test"]).unlink()
    with pytest.raises(MissingDataError, match="conv7x7_test.npy"):
        load_released_kernels(tmp_path, verify=False)


def test_prior_from_released_kernels(tmp_path):
    """``source="released"``: no source nets; the 7x7 VAE trains on the train file and is
    scored on the test file, the 5x5 one on a 90/10 split of its only file."""
    _write_release(tmp_path)
    source = load_released_kernels(tmp_path, verify=False)
    settings = DWPSettings(
        source="released", latent_dims=(2, 2), vae_hidden=(8,), vae_steps=20, vae_batch=16, steps_per_call=10
    )
    prior, kernels, info = learn_prior(jax.random.key(0), settings, source)
    assert "source_acc" not in info and "time_source_s" not in info
    assert info["num_source_kernels_l0"] == 40 and info["num_source_kernels_l1"] == 60
    assert [k.shape[1:] for k in kernels] == [(7, 7), (5, 5)]
    assert np.asarray(prior.vaes[0].sample(jax.random.key(1), 3)).shape == (3, 7, 7)
    for layer in (0, 1):
        assert np.isfinite(info[f"vae_l{layer}_gain_over_gaussian"])
        assert info[f"kernel_corr_l{layer}"] > 0.3  # the generated kernels are blurred noise
    with pytest.raises(ValueError, match="settings.source"):
        learn_prior(jax.random.key(0), dataclasses.replace(settings, source="mine"), source)
    with pytest.raises(ValueError, match="layers of kernels"):
        learn_prior(jax.random.key(0), settings, source[:1])


def test_kernel_statistics_by_hand():
    # independent weights: correlation near 0; a kernel that is one value repeated: 1
    rng = np.random.default_rng(0)
    assert abs(neighbour_correlation(rng.normal(size=(4000, 5, 5)))) < 0.02  # sd of r ~ 1/sqrt(160000)
    flat = rng.normal(size=(500, 1, 1)) * np.ones((1, 3, 3))
    assert neighbour_correlation(flat) == pytest.approx(1.0)
    # Gaussian baseline: a standard normal per weight, scored on zeros, is -k*k/2 log(2 pi)
    train = rng.normal(size=(200000, 2, 2))
    expected = -4 * 0.5 * np.log(2 * np.pi)
    assert gaussian_loglik(train, np.zeros((3, 2, 2))) == pytest.approx(expected, abs=0.02)


def test_balanced_order_gives_stratified_nested_prefixes():
    from metaprior.data import balanced_order

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=500)
    order = rng.permutation(500)
    out = balanced_order(order, labels)
    assert sorted(out.tolist()) == list(range(500))  # a permutation
    for n in (10, 50, 100):
        counts = np.bincount(labels[out[:n]], minlength=10)
        assert counts.min() == counts.max() == n // 10
    # within each class the original order is kept (so another key gives another split)
    for c in range(10):
        np.testing.assert_array_equal(out[labels[out] == c], order[labels[order] == c])
    with pytest.raises(ValueError, match="order must be 1-D indices"):
        balanced_order(np.array([0, 600]), labels)


def test_dihedral_augmentation_is_the_group_orbit_and_leaves_the_baseline_alone():
    from metaprior.inference.dwp_source import dihedral, train_kernel_vae

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4, 4)).astype(np.float32)
    out = np.asarray(dihedral(w))
    assert out.shape == (24, 4, 4)
    np.testing.assert_array_equal(out[:3], w)  # the identity first
    # eight distinct transforms of a generic kernel, each an isometry of its entries
    orbit = out.reshape(8, 3, 16)
    assert len({orbit[g, 0].tobytes() for g in range(8)}) == 8
    np.testing.assert_allclose(np.sort(orbit, axis=-1), np.sort(np.broadcast_to(w.reshape(1, 3, 16), orbit.shape), -1))
    # closed under the group: the orbit of a rotated (or reflected) kernel is the same set
    for g in (1, 4, 7):
        same = np.asarray(dihedral(out[3 * g : 3 * g + 1])).reshape(8, 16)
        assert {r.tobytes() for r in same} == {orbit[h, 0].tobytes() for h in range(8)}
    # train_kernel_vae: the per-position Gaussian baseline is fitted on the unaugmented kernels
    base = DWPSettings(kernel_sizes=(4,), latent_dims=(2,), vae_hidden=(8,), vae_steps=2, vae_batch=8)
    kernels = rng.normal(size=(40, 4, 4)).astype(np.float32) + np.arange(16).reshape(4, 4)
    infos = [
        train_kernel_vae(jax.random.key(0), dataclasses.replace(base, kernel_augment=a), kernels, 0)[1]
        for a in ("none", "dihedral")
    ]
    assert infos[0]["gaussian_loglik"] == infos[1]["gaussian_loglik"]
    with pytest.raises(ValueError, match="kernel_augment"):
        DWPSettings(kernel_augment="rotate")
