"""Evaluation of an LCL model: the paper's frozen-transfer protocol and zero-shot transfer.

- :mod:`.probe`: classification from the frozen encoder (attentive or linear probe);
- :mod:`.retrieval`: image↔text retrieval (Karpathy-split COCO/Flickr30k, webdataset shards);
- :mod:`.caption`: captions from LCL's own language model, BLEU-4 and CIDEr;
- :mod:`.zeroshot`: zero-shot classification on an ImageNet-style folder;
- :mod:`.common`: model loading, text and image features, image folders.

Command line: ``python -m lcl_fast.eval {probe,retrieval,caption,zeroshot} ...`` (``--help`` on
each); without a subcommand it runs the held-out retrieval of the built-in corpus (and
``--imagenet-val DIR`` zero-shot), as before.
"""

from __future__ import annotations

from .common import IMAGE_EXTENSIONS, EvalInputError, encode_images, encode_texts, image_folder
from .retrieval import evaluate_retrieval, multi_caption_metrics, retrieval_metrics
from .zeroshot import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    TEMPLATE_SETS,
    evaluate_zero_shot,
    load_templates,
    zero_shot_classifier,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "EvalInputError",
    "encode_images",
    "encode_texts",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "image_folder",
    "load_templates",
    "main",
    "multi_caption_metrics",
    "retrieval_metrics",
    "zero_shot_classifier",
]


def main(argv=None) -> dict:
    """``python -m lcl_fast.eval``: see :mod:`lcl_fast.eval.__main__`."""
    from .__main__ import main as _main

    return _main(argv)
