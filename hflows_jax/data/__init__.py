"""Input data: dataset sources, batching and augmentation."""

from hflows_jax.data.sources import ArrayDataset, load_dataset, load_npz, load_tfds

__all__ = ["ArrayDataset", "load_dataset", "load_npz", "load_tfds"]
