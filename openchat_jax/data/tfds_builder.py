"""TFDS builder writing prepared examples as ArrayRecord, without TensorFlow.

Checked with tensorflow-datasets 4.9.10 and no TensorFlow installed: `GeneratorBasedBuilder` with
`file_format="array_record"` prepares, and `builder_from_directory(...).as_data_source()` reads
back random-access. `disable_shuffling=True` keeps the generation order, so record i of the
data source is example i (the loader's length index relies on that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

BUILDER_NAME = "openchat_conversations"
VERSION = "1.0.0"
SPLIT = "train"


def features():
    return tfds.features.FeaturesDict({
        # raw bytes encoding: no per-element protobuf lists, much faster to write and read
        "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES),
        "weights": tfds.features.Tensor(shape=(None,), dtype=np.float32, encoding=tfds.features.Encoding.BYTES),
        "class_id": tfds.features.Scalar(dtype=np.int32),
    })


class OpenchatConversations(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Examples come from the callable given at construction (prepare's tokenization pipeline)."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, examples: Callable[[], Iterator[tuple[int, dict]]], description: str = "", **kwargs):
        self._examples = examples
        self._description = description
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources` (not installed) for packaged builders.
        return epath.Path(__file__)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self._description, features=features(),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        yield from self._examples()


def make_builder(data_dir: Path, examples: Callable[[], Iterator[tuple[int, dict]]], description: str = ""):
    return OpenchatConversations(examples, description, data_dir=str(data_dir), file_format="array_record")


def version_dir(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / BUILDER_NAME / VERSION


def open_data_source(dataset_dir: Path):
    """Random-access source: `src[i] -> {"tokens", "weights", "class_id"}`, `len(src)`."""
    return tfds.builder_from_directory(str(version_dir(dataset_dir))).as_data_source(split=SPLIT)
