"""The few-shot table: fixed test beds, the same episodes for every method, out-of-domain
pools free of Omniglot, the tiled head, the table and Lake's runs through the recipe."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metaprior.data.testbeds import bed_key, fewshot_testbeds, ood_pool, resize_images
from metaprior.inference import fewshot as F
from metaprior.inference.fewshot import TrainedMethod, fewshot_table, method_of, with_ways
from metaprior.models.nets import Conv4


def _pool(rng, classes=6, examples=8, side=8):
    return rng.uniform(size=(classes, examples, side, side, 1)).astype(np.float32)


def _hashes(images) -> set[bytes]:
    flat = np.asarray(images, np.float32).reshape(-1, *np.shape(images)[-3:])
    return {hashlib.sha1(im.tobytes()).digest() for im in flat}


def test_bed_batches_are_the_same_for_every_caller():
    pool = _pool(np.random.default_rng(0))
    (bed,) = fewshot_testbeds(jax.random.key(0), {"id": pool}, {"id": [(3, 1)]}, num_episodes=7, queries=2)
    first = list(bed.batches(3))
    second = list(bed.batches(3))
    assert [b.query_x.shape[0] for b in first] == [3, 3, 1]
    for a, b in zip(first, second):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert bed.name == "id_3w1s"


def test_bed_keys_do_not_depend_on_the_other_beds():
    rng = np.random.default_rng(1)
    pools = {"id": _pool(rng), "ood_mnist": _pool(rng)}
    alone = fewshot_testbeds(jax.random.key(3), {"id": pools["id"]}, {"id": [(3, 1)]}, num_episodes=2, queries=1)
    both = fewshot_testbeds(
        jax.random.key(3), pools, {"ood_mnist": [(2, 1)], "id": [(3, 1)]}, num_episodes=2, queries=1
    )
    ep_alone = next(alone[0].batches())
    ep_both = next([b for b in both if b.bed == "id"][0].batches())
    np.testing.assert_array_equal(np.asarray(ep_alone.support_x), np.asarray(ep_both.support_x))
    assert not np.array_equal(
        np.asarray(jax.random.key_data(bed_key(jax.random.key(3), "id", 5, 1))),
        np.asarray(jax.random.key_data(bed_key(jax.random.key(3), "ood_mnist", 5, 1))),
    )


def test_testbeds_reject_impossible_shapes():
    pool = _pool(np.random.default_rng(2), classes=4, examples=5)
    with pytest.raises(ValueError, match="bed 'id', 5-way 1-shot"):
        fewshot_testbeds(jax.random.key(0), {"id": pool}, {"id": [(5, 1)]}, num_episodes=1, queries=1)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        fewshot_testbeds(jax.random.key(0), {"id": pool}, {"id": [(2, 1)]}, num_episodes=1, queries=5)
    with pytest.raises(ValueError, match="without a pool"):
        fewshot_testbeds(jax.random.key(0), {"id": pool}, {"ood_mnist": [(2, 1)]}, num_episodes=1, queries=1)
    with pytest.raises(ValueError, match="num_episodes"):
        fewshot_testbeds(jax.random.key(0), {"id": pool}, {"id": [(2, 1)]}, num_episodes=0, queries=1)


def test_resize_keeps_size_and_range():
    x = np.random.default_rng(0).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    assert resize_images(x, 28) is x or np.array_equal(resize_images(x, 28), x)
    small = resize_images(x, 14)
    assert small.shape == (3, 14, 14, 1) and small.min() >= 0 and small.max() <= 1


@pytest.mark.parametrize("name", ["ood_mnist", "ood_notmnist"])
def test_ood_episodes_hold_no_omniglot_image(shared_data_dir, name):
    """Every image of an out-of-domain episode is one of the data set's own test images
    (found by exact bytes), and none is an Omniglot image."""
    from metaprior.data import load_mnist, load_notmnist, omniglot_splits

    pool = ood_pool(name, 28, shared_data_dir)
    assert pool.shape[0] == 10 and pool.shape[2:] == (28, 28, 1)
    (bed,) = fewshot_testbeds(jax.random.key(0), {name: pool}, {name: [(5, 5)]}, num_episodes=20, queries=15)
    seen = set()
    for ep in bed.batches(10):
        seen |= _hashes(ep.support_x) | _hashes(ep.query_x)
    source = (load_mnist if name == "ood_mnist" else load_notmnist)("test", shared_data_dir)[0]
    assert seen <= _hashes(source)
    omniglot = omniglot_splits(28, rotations=False, seed=0, data_dir=shared_data_dir, held_out="character")
    assert not seen & set().union(*(_hashes(s.images) for s in omniglot.values()))


def test_with_ways_tiles_the_mean_head_row():
    net = Conv4(5, filters=4, image_size=16, key=jax.random.key(0))
    assert with_ways(net, 5) is net
    wide = with_ways(net, 20)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
    logits = wide(x)
    assert logits.shape == (3, 20)
    np.testing.assert_allclose(logits, jnp.broadcast_to(logits[:, :1], (3, 20)), rtol=1e-6)
    mean_logit = net.features(x) @ net.head.weight.mean(0) + net.head.bias.mean()
    np.testing.assert_allclose(logits[:, 0], mean_logit, rtol=1e-5, atol=1e-6)
    # the body is untouched
    assert eqx.tree_equal(wide.convs, net.convs)


def test_grouped_predictives_split_into_the_variants_rows():
    # a group (variants sharing one posterior) returns [V, T, Q, W]; predictives() hands each
    # variant its own row, and a single variant is grouped as a one-row stack.
    joint = lambda key, sx, sy, qx: jnp.stack([qx * 1.0, qx * 2.0])
    single = lambda key, sx, sy, qx: qx * 3.0
    t = TrainedMethod("m", None, np.zeros(1), 0.0, lambda ways, n=None: {("a", "b"): joint, "c": single, "d": None}, {})
    x = jnp.arange(6.0).reshape(1, 2, 3)
    args = (jax.random.key(0), x, x, x)
    split = t.predictives(5)
    assert sorted(split) == ["a", "b", "c", "d"] and split["d"] is None
    np.testing.assert_array_equal(split["b"](*args), 2.0 * x)
    np.testing.assert_array_equal(split["c"](*args), 3.0 * x)
    grouped = t.grouped_predictives(5)
    assert sorted(grouped) == [("a", "b"), ("c",), ("d",)] and grouped[("d",)] is None
    np.testing.assert_array_equal(grouped[("c",)](*args), 3.0 * x[None])


def test_table_has_a_row_per_variant_and_na_where_missing():
    m = {"maml_id_5w1s_acc": 0.9, "maml_id_5w1s_acc_ci95": 0.01, "maml_id_5w1s_ece": 0.02, "maml_id_5w1s_nll": 0.3}
    m["maml_train_time_s"] = 12.4
    table = fewshot_table(m, ["maml", "sib_t3"], ["id_5w1s"])
    lines = table.strip().splitlines()
    assert lines[0] == "| method | id_5w1s acc / ECE / NLL | train s |"
    assert lines[2] == "| maml | 0.900 ± 0.010 / 0.020 / 0.300 | 12 |"
    assert lines[3] == "| sib_t3 | n/a | - |"
    assert method_of("llama_glm") == "llama" and method_of("sib_t0") == "sib"
    with pytest.raises(ValueError, match="unknown variant"):
        method_of("maml2")


def _nearest(ways, num_samples=None):
    """A pixel nearest-neighbour predictive (any ways): error 0 on the stripe fixture."""

    def predict(key, sx, sy, qx):
        d = ((qx[:, :, None] - sx[:, None]) ** 2).sum((-3, -2, -1))
        return jax.nn.one_hot(jnp.take_along_axis(sy, d.argmin(-1), axis=1), ways)

    return {"protonet": predict}


def test_oneshot_runs_are_scored_through_the_recipe(tmp_path):
    """The Lake-runs scorer the recipe calls, on a generated release (``omniglot/all_runs.zip``):
    a predictive that is right on every run gets error 0, a permuted one error 1; without
    the zip the metrics say why it was skipped."""
    from test_data_loaders import _write_runs

    _write_runs(tmp_path / "src" / "all_runs", num_runs=3)
    (tmp_path / "data" / "omniglot").mkdir(parents=True)
    shutil.make_archive(str(tmp_path / "data" / "omniglot" / "all_runs"), "zip", tmp_path / "src", "all_runs")
    data = str(tmp_path / "data")
    right = TrainedMethod("protonet", None, np.zeros(1), 0.0, _nearest, {})
    assert F.oneshot_errors(jax.random.key(0), {"protonet": right}, 28, data) == {"protonet_oneshot_error": 0.0}

    def shifted(ways, num_samples=None):
        inner = _nearest(ways)["protonet"]
        return {"protonet": lambda k, sx, sy, qx: jnp.roll(inner(k, sx, sy, qx), 1, axis=-1)}

    wrong = {"protonet": TrainedMethod("protonet", None, [], 0.0, shifted, {})}
    assert F.oneshot_errors(jax.random.key(0), wrong, 28, data) == {"protonet_oneshot_error": 1.0}
    metrics = F.oneshot_errors(jax.random.key(0), {"protonet": right}, 28, str(tmp_path / "nothing"))
    assert metrics["oneshot_note"].startswith("skipped: ") and "all_runs.zip" in metrics["oneshot_note"]


def test_every_method_sees_the_same_episodes(shared_data_dir, tmp_path, monkeypatch):
    """The recipe at a tiny size with two methods: each (variant, bed) evaluation is handed
    the same images and labels as every other variant's on that bed, and so is every
    learning-curve snapshot's on the validation episodes."""
    from metaprior.experiments import fewshot

    seen: dict[tuple[str, str], bytes] = {}
    real = fewshot.evaluate_fewshot

    def recording(key, predict, episodes, **kw):
        episodes = list(episodes)
        digest = hashlib.sha1()
        for e in episodes:
            for a in e:
                digest.update(np.asarray(a).tobytes())
        seen[(kw["desc"], "")] = digest.digest()
        return real(key, predict, episodes, **kw)

    monkeypatch.setattr(fewshot, "evaluate_fewshot", recording)
    monkeypatch.setattr(F, "evaluate_fewshot", recording)  # the learning curves
    config = dataclasses.replace(
        fewshot.make_config("quick"),
        methods=("maml_fo", "protonet"),
        beds=("id", "ood_mnist"),
        id_shapes=((5, 1),),
        data_dir=str(shared_data_dir),
    )
    metrics = fewshot.run(jax.random.key(0), config, tmp_path)
    by_bed: dict[str, set[bytes]] = {}
    for (desc, _), digest in seen.items():
        by_bed.setdefault(desc.split(" ", 1)[1], set()).add(digest)
    assert sorted(by_bed) == ["id_5w1s", "ood_mnist_5w1s", "val_5w1s"]
    assert all(len(d) == 1 for d in by_bed.values()), "two methods saw different episodes"
    for key in ("maml_fo_id_5w1s_acc", "protonet_ood_mnist_5w1s_ece", "protonet_id_5w1s_ece_lo"):
        assert key in metrics
    assert (tmp_path / "fewshot_table.md").read_text().count("\n") == 4  # header, rule, two rows
    for name in ("reliability_id_5w1s.png", "acc_vs_ece.png", "maml_fo.ckpt", "protonet.ckpt"):
        assert (tmp_path / name).exists()
    assert not (tmp_path / "posterior.nc").exists()  # neither method is Bayesian


def test_a_training_budget_gives_each_method_the_steps_it_paid_for(tmp_path, monkeypatch):
    """``budget_s``: with a clock on which every compiled call takes one second, ProtoNets
    (2 steps per call, budget 2.5 s) stop after 3 calls (6 steps, num_steps 100 a cap) and
    checkpoint there; the same call again trains no further; an uninterrupted 6-step run
    without a budget has the same parameters bit for bit, and so has a run killed part-way
    and resumed. SIB's pretraining and each of its T runs get half the budget (2 calls of 2
    steps)."""
    from metaprior.inference import meta
    from metaprior.inference.fewshot import FewShotSettings, train_method

    ticks = iter(range(10**6))
    monkeypatch.setattr(meta, "_clock", lambda: float(next(ticks)))
    images = jax.random.uniform(jax.random.key(0), (6, 4, 28, 28, 1))
    tiny = dict(filters=2, meta_batch=2, ways=3, train_queries=1, steps_per_call=2, checkpoint_every=2)
    tiny.update(sib_pretrain_batch=4, sib_draws=2)
    budget = FewShotSettings(**tiny, num_steps=100, sib_pretrain_steps=100, budget_s=2.5)
    ckpt = tmp_path / "protonet.ckpt"
    timed = train_method("protonet", jax.random.key(1), budget, images, checkpoint=ckpt)
    assert timed.info["train_steps"] == 6 and timed.losses.shape == (6,)
    again = train_method("protonet", jax.random.key(1), budget, images, checkpoint=ckpt)
    assert again.info["train_steps"] == 6
    straight = train_method("protonet", jax.random.key(1), FewShotSettings(**tiny, num_steps=6), images)
    for a, b in zip(jax.tree.leaves(timed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)
    # killed part-way: a NaN at step 5 stops the run after its checkpoint at step 4 (2 s spent);
    # the rerun resumes with that time and stops where the uninterrupted budget run stopped
    killed = tmp_path / "protonet_killed.ckpt"
    monkeypatch.setenv("METAPRIOR_TEST_NAN_AT_STEP", "5")
    with pytest.raises(meta.NonFiniteLossError):
        train_method("protonet", jax.random.key(1), budget, images, checkpoint=killed)
    assert meta.load_clock(killed) == meta.TrainingClock(2.0, False)
    monkeypatch.delenv("METAPRIOR_TEST_NAN_AT_STEP")
    resumed = train_method("protonet", jax.random.key(1), budget, images, checkpoint=killed)
    assert resumed.info["train_steps"] == 6
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        np.testing.assert_array_equal(a, b)
    sib = train_method("sib", jax.random.key(2), budget, images, checkpoint=tmp_path / "sib.ckpt")
    assert (sib.info["pretrain_steps"], sib.info["train_steps_t0"], sib.info["train_steps_t3"]) == (4, 4, 4)


def test_per_way_models_score_each_ways_with_their_own_model():
    """``combine_ways``: a 20-way predictive comes from the model trained at 20 ways, any
    other ways from the base (5-way) model; times add up, the base model's info keys stay,
    the others' are prefixed with their ways; the table shows each model's seconds."""
    from metaprior.inference.fewshot import combine_ways

    def trained(ways, seconds):
        make = lambda w, n=None: {("maml",): f"model{ways} at {w}"}
        return TrainedMethod("maml", f"p{ways}", np.zeros(3), seconds, make, {"train_steps": ways})

    t = combine_ways({5: trained(5, 10.0), 20: trained(20, 40.0)}, base=5)
    assert t.make_predictives(20, None) == {("maml",): "model20 at 20"}
    assert t.make_predictives(10, None) == {("maml",): "model5 at 10"}
    assert t.train_time_s == 50.0 and t.params == {5: "p5", 20: "p20"} and t.losses.shape == (6,)
    assert t.info == {"train_steps": 5, "5w_train_time_s": 10.0, "20w_train_time_s": 40.0, "20w_train_steps": 20}
    m = {"maml_train_time_s": 50.0, **{f"maml_{k}": v for k, v in t.info.items()}}
    m.update(maml_id_5w1s_acc=0.9, maml_id_5w1s_acc_ci95=0.01, maml_id_5w1s_ece=0.05, maml_id_5w1s_nll=0.3)
    assert "| 5w 10 / 20w 40 |" in fewshot_table(m, ["maml"], ["id_5w1s"])
