"""lamina.data: built-in and file data sets (a registry), splits, batched loaders and batched transforms.

Importing the package imports `builtin` and `files` so that every data set is registered; their heavy
dependencies (scikit-learn, pandas, Pillow) load only when a loader runs.
"""

from lamina.data import builtin, files  # noqa: F401  (fill the registry)
from lamina.data import parallel  # noqa: F401  (parallel corpora: multi30k, parallel)
from lamina.data import multimodal  # noqa: F401  (fashion_captions, fsdd_fusion)
from lamina.data import text_classification  # noqa: F401  (text_classification, shakespeare_speakers, text_mlm)
from lamina.data import speech  # noqa: F401  (fsdd_sequences: spoken digit sequences for CTC)
from lamina.data import medical  # noqa: F401  (pneumoniamnist)
from lamina.data import detection  # noqa: F401  (fashion_scenes)
from lamina.data import faces  # noqa: F401  (faces: a folder per person; ORL by default)
from lamina.data import interactions  # noqa: F401  (interactions: user-item implicit feedback; MovieTweetings)
from lamina.data import qa  # noqa: F401  (squad: extractive question answering, XQuAD English by default)
from lamina.data import summarization  # noqa: F401  (scitldr: abstract -> TLDR)
from lamina.data import tokenfiles  # noqa: F401  (token_bin: memory-mapped train.bin/val.bin token streams)
from lamina.data.base import DataBundle, TensorData
from lamina.data.files import decode_text, encode_text, load_image_files, read_idx, transform_table_rows
from lamina.data.loader import InMemoryLoader, make_loader
from lamina.data.registry import get_dataset_entry, list_datasets, load_dataset, register_dataset
from lamina.data.splits import split_indices
from lamina.data.transforms import build_transforms

__all__ = [
    "TensorData", "DataBundle", "load_dataset", "list_datasets", "get_dataset_entry", "register_dataset",
    "InMemoryLoader", "make_loader", "split_indices", "build_transforms",
    "transform_table_rows", "load_image_files", "encode_text", "decode_text", "read_idx",
]
