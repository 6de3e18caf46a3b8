"""Data: datasets as uint8 tensors, PBA's reduced split, the device-resident loader."""

from .datasets import (SAMPLE_PATH, DataBundle, Split, bundle_from_dataset, bundle_from_tensors, load_dataset,
                       load_jpeg_npz, reduced_split, register_dataset)
from .loader import DeviceLoader

__all__ = ["SAMPLE_PATH", "DataBundle", "Split", "load_dataset", "load_jpeg_npz", "reduced_split", "DeviceLoader",
           "register_dataset", "bundle_from_tensors", "bundle_from_dataset"]
