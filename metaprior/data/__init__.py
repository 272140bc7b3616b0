# --- Real few-shot data: loaders, splits and the episode sampler (issue 3). ---
from metaprior.data.store import (  # noqa: E402
    CorruptDataError, DataError, KNOWN_FILES, MissingDataError, cache_dir, data_dir, download,
    verify_file)
from metaprior.data.fewshot import (  # noqa: E402
    FewShotDataset, as_class_array, mix_held_out, split_by_group, with_rotations)
from metaprior.data.idx import load_fashion_mnist, load_idx, load_mnist, load_notmnist  # noqa: E402
from metaprior.data.episodes import (  # noqa: E402
    EpisodeIndices, Episodes, sample_episode_indices, sample_episodes)
from metaprior.data.omniglot import (  # noqa: E402
    OneShotRun, load_omniglot, load_oneshot_runs, omniglot_splits, oneshot_episodes,
    score_oneshot_runs)
from metaprior.data.miniimagenet import convert_miniimagenet_pickle, load_miniimagenet  # noqa: E402

__all__ = [*globals().get("__all__", ()),  # keeps names exported by lines above this block
           "data_dir", "cache_dir", "download", "verify_file", "KNOWN_FILES",
           "DataError", "MissingDataError", "CorruptDataError",
           "FewShotDataset", "as_class_array", "split_by_group", "mix_held_out", "with_rotations",
           "load_idx", "load_mnist", "load_notmnist", "load_fashion_mnist",
           "Episodes", "EpisodeIndices", "sample_episodes", "sample_episode_indices",
           "load_omniglot", "omniglot_splits", "OneShotRun", "load_oneshot_runs",
           "oneshot_episodes", "score_oneshot_runs",
           "load_miniimagenet", "convert_miniimagenet_pickle"]
# --- end of issue 3 block ---
