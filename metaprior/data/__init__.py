"""Data: keyed task generators, real-data loaders and the episode sampler.

Every sampler takes ``rng_key`` first; loaders read ``METAPRIOR_DATA`` and verify files.
"""

from metaprior.data.episodes import EpisodeIndices, Episodes, episode_batches, sample_episode_indices, sample_episodes
from metaprior.data.fewshot import (
    FewShotDataset,
    as_class_array,
    balanced_order,
    mix_held_out,
    split_by_group,
    with_rotations,
)
from metaprior.data.idx import load_fashion_mnist, load_idx, load_mnist, load_notmnist
from metaprior.data.miniimagenet import convert_miniimagenet_pickle, load_miniimagenet
from metaprior.data.omniglot import (
    OneShotRun,
    load_omniglot,
    load_oneshot_runs,
    omniglot_splits,
    oneshot_episodes,
    score_oneshot_runs,
)
from metaprior.data.store import (
    KNOWN_FILES,
    CorruptDataError,
    DataError,
    MissingDataError,
    cache_dir,
    data_dir,
    download,
    verify_file,
)
from metaprior.data.testbeds import TestBed, fewshot_testbeds, ood_pool

__all__ = [
    "data_dir",
    "cache_dir",
    "download",
    "verify_file",
    "KNOWN_FILES",
    "DataError",
    "MissingDataError",
    "CorruptDataError",
    "FewShotDataset",
    "as_class_array",
    "balanced_order",
    "split_by_group",
    "mix_held_out",
    "with_rotations",
    "load_idx",
    "load_mnist",
    "load_notmnist",
    "load_fashion_mnist",
    "Episodes",
    "EpisodeIndices",
    "sample_episodes",
    "episode_batches",
    "sample_episode_indices",
    "load_omniglot",
    "omniglot_splits",
    "OneShotRun",
    "load_oneshot_runs",
    "oneshot_episodes",
    "score_oneshot_runs",
    "load_miniimagenet",
    "convert_miniimagenet_pickle",
    "TestBed",
    "fewshot_testbeds",
    "ood_pool",
]
