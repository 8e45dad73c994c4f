"""Captioning with LCL's own language model, scored with pycocoevalcap's BLEU-4 and CIDEr.

Input in COCO caption format: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}`` and a folder of the images. Each image is written first (``<start_of_img>``,
latents, ``<end_of_img>``) and its caption generated after it (:mod:`lcl_fast.generation`).

Scoring uses pycocoevalcap's Python scorers only (``Bleu(4)``, ``Cider()``); the Java PTB
tokenizer is replaced by :func:`normalize_caption` (lower case, PTB-style split of clitics,
punctuation removed, as PTBTokenizer's output is), so no Java is needed.
"""

from __future__ import annotations

import os
import re
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .common import Autocast, EvalInputError, device_of, load_images, log, read_json

# What pycocoevalcap's PTBTokenizer drops, as characters; clitics split off as PTB does.
_PUNCT = re.compile(r"[\"'`.,?!:;\-()\[\]{}]+")
_CLITIC = re.compile(r"(\w)('s|'re|'ve|'ll|'d|'m|n't)\b")


def normalize_caption(text: str) -> str:
    """Lower case, clitics split (``dog's`` → ``dog 's``, then the quote dropped), punctuation removed."""
    text = _CLITIC.sub(r"\1 \2", text.lower())
    return " ".join(_PUNCT.sub(" ", text).split())


def _scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as err:
        raise ImportError(
            "captioning scores need pycocoevalcap: pip install 'lcl-fast[eval]' (or pip install pycocoevalcap)"
        ) from err
    return Bleu, Cider


def score_captions(references: dict, candidates: dict) -> dict[str, float]:
    """``bleu4`` and ``cider`` of ``candidates {id: caption}`` against ``references {id: [captions]}``.

    CIDEr's document frequencies come from the references given, so score a whole set at once.
    """
    Bleu, Cider = _scorers()
    ids = sorted(candidates, key=str)
    if not ids:
        raise ValueError("no captions to score")
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"no reference captions for ids {missing[:5]}")
    gts = {i: [normalize_caption(r) for r in references[i]] for i in ids}
    res = {i: [normalize_caption(candidates[i])] for i in ids}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "num_images": len(ids)}


def load_coco_captions(
    annotations: Union[str, os.PathLike], images: Union[str, os.PathLike]
) -> tuple[list[int], list[Path], dict]:
    """``(image ids, image files, {image id: [reference captions]})``; images without captions are left out."""
    data = read_json(annotations)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise EvalInputError(f"{annotations}: expected COCO caption format with 'images' and 'annotations' lists")
    root = Path(images)
    if not root.is_dir():
        raise EvalInputError(f"--images {root}: not a folder")
    refs: dict = {}
    for k, ann in enumerate(data["annotations"]):
        try:
            refs.setdefault(ann["image_id"], []).append(str(ann["caption"]))
        except (KeyError, TypeError) as err:
            raise EvalInputError(f"{annotations}: annotations[{k}] lacks image_id/caption ({err!r})") from err
    ids, files = [], []
    for k, img in enumerate(data["images"]):
        try:
            image_id, name = img["id"], img["file_name"]
        except (KeyError, TypeError) as err:
            raise EvalInputError(f"{annotations}: images[{k}] lacks id/file_name ({err!r})") from err
        if image_id in refs:
            ids.append(image_id)
            files.append(root / name)
    if not ids:
        raise EvalInputError(f"{annotations}: no image has a caption")
    return ids, files, refs


def caption(model, tokenizer, images: Any, **kwargs) -> list[str]:
    """:func:`lcl_fast.caption`: :func:`lcl_fast.generation.caption` of a normalised ``[N, 3, S, S]`` tensor,
    or of PIL images, encoded bytes or file paths (decoded with the eval transform of :mod:`lcl_fast.data`)."""
    from ..data.decode import eval_images
    from ..generation import caption as generate_caption

    def decode(items) -> torch.Tensor:
        return eval_images(items, model.vision_cfg.image_size, device=device_of(model))

    return generate_caption(model, tokenizer, images, decode=decode, **kwargs)


@torch.no_grad()
def generate_captions(
    model,
    tokenizer,
    images: torch.Tensor,
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    batch_size: int = 64,
    autocast: Autocast = nullcontext,
) -> list[str]:
    """Captions of normalised ``images [N, 3, S, S]`` (greedy, or beam search with ``num_beams``)."""
    from ..generation import caption

    with autocast():
        return caption(
            model, tokenizer, images, max_new_tokens=max_new_tokens, num_beams=num_beams, batch_size=batch_size
        )


def evaluate_captions(
    model,
    tokenizer,
    images: torch.Tensor,
    references: Sequence[Sequence[str]],
    **kwargs,
) -> dict:
    """Generate captions for ``images`` and score them against ``references`` (one list per image);
    the result holds ``bleu4``, ``cider``, ``num_images`` and the ``captions``."""
    captions = generate_captions(model, tokenizer, images, **kwargs)
    out = score_captions(dict(enumerate(references)), dict(enumerate(captions)))
    out["captions"] = captions
    return out


@torch.no_grad()
def evaluate_coco_captions(
    model,
    tokenizer,
    annotations: Union[str, os.PathLike],
    images: Union[str, os.PathLike],
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    batch_size: int = 64,
    workers: int = 2,
    autocast: Autocast = nullcontext,
    max_images: Optional[int] = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """``(metrics, COCO results [{image_id, caption}])``; undecodable images are skipped and counted."""
    ids, files, refs = load_coco_captions(annotations, images)
    if max_images is not None:
        ids, files = ids[:max_images], files[:max_images]
    batches, skipped = load_images(
        files,
        model.vision_cfg.image_size,
        batch_size=batch_size,
        workers=workers,
        device=device_of(model),
        progress="captions" if progress else None,
    )
    results = []
    for idx, batch in batches:
        texts = generate_captions(
            model,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            batch_size=batch_size,
            autocast=autocast,
        )
        results += [{"image_id": ids[i], "caption": t} for i, t in zip(idx.tolist(), texts)]
    if not results:
        raise EvalInputError(f"none of the {len(files)} images under {images} could be decoded")
    if skipped["image_decode"]:
        log.warning("caption: skipped %d images that cannot be decoded", skipped["image_decode"])
    metrics = score_captions(refs, {r["image_id"]: r["caption"] for r in results})
    metrics["skipped"] = skipped["image_decode"]
    return metrics, results
