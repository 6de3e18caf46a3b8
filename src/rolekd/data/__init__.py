"""Data: datasets as uint8 tensors, PBA's reduced split, the device-resident loader."""

from .datasets import SAMPLE_PATH, DataBundle, Split, load_dataset, load_jpeg_npz, reduced_split
from .loader import DeviceLoader

__all__ = ["SAMPLE_PATH", "DataBundle", "Split", "load_dataset", "load_jpeg_npz", "reduced_split", "DeviceLoader"]
