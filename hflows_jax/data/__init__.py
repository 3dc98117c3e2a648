"""Input data: dataset sources, batching and augmentation."""

from hflows_jax.data.pipeline import (
    channel_stats,
    epoch_order,
    normalize,
    random_crop_flip,
    steps_per_epoch,
    train_batches,
)
from hflows_jax.data.sources import ArrayDataset, load_dataset, load_npz, load_tfds

__all__ = ["ArrayDataset", "channel_stats", "epoch_order", "load_dataset", "load_npz",
           "load_tfds", "normalize", "random_crop_flip", "steps_per_epoch", "train_batches"]
