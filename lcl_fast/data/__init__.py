"""Data: tokenizer, sequence builders, shard readers, image decoding (DALI or PIL), the loader.

- :func:`build_train_loader`: streaming, sharded, resumable training batches (see :mod:`.loader`);
- :func:`build_eval_pairs`: held-out image–caption pairs for retrieval;
- :func:`decode_batch`: the image path on its own (benchmarks);
- :mod:`.synthetic`: the built-in corpus (``ensure_corpus``);
- :class:`DataError`: input that cannot be trained on (one line naming the file).
"""

from .decode import decode_batch
from .errors import DataError
from .loader import TrainLoader, build_eval_pairs, build_train_loader
from .tokenizer import get_tokenizer

__all__ = ["DataError", "TrainLoader", "build_eval_pairs", "build_train_loader", "decode_batch", "get_tokenizer"]
