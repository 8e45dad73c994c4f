"""Image↔text retrieval: recall@k both ways, from paired features or from a dataset on disk.

Datasets: COCO or Flickr30k in the Karpathy-split format (``dataset_coco.json`` /
``dataset_flickr30k.json``: ``{"images": [{"filename", "filepath"?, "split", "sentences":
[{"raw"}, ...]}]}``, several captions per image), or webdataset eval shards (one caption per
image). Image→text counts a hit when any of the image's captions is among the top k texts;
text→image when the caption's image is among the top k images.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .common import (
    Autocast,
    EvalInputError,
    device_of,
    encode_images,
    encode_texts,
    load_images,
    log,
    read_json,
)


def retrieval_metrics(
    image_features: torch.Tensor, text_features: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k of paired features (row i of each is pair i), both directions, and their mean R@1."""
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {list(image_features.shape)} and text features "
            f"{list(text_features.shape)} must pair up row by row"
        )
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval needs at least one pair")
    sims = image_features.float() @ text_features.float().T
    truth = sims.diagonal()
    # Rank of the true match: how many candidates score strictly higher (ties count in the model's favour).
    rank_i2t = (sims > truth[:, None]).sum(1)
    rank_t2i = (sims > truth[None, :]).sum(0)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((rank_i2t < k).float().mean())
        out[f"text_to_image_R@{k}"] = float((rank_t2i < k).float().mean())
    out["retrieval_top1"] = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2 if 1 in ks else float("nan")
    # Mean rank (1 = best) is far more sensitive than recall@1 early in training; chance is (n + 1) / 2.
    out["image_to_text_mean_rank"] = float(rank_i2t.float().mean()) + 1
    out["text_to_image_mean_rank"] = float(rank_t2i.float().mean()) + 1
    out["num_pairs"] = n
    out["chance"] = 1.0 / n
    return out


def multi_caption_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k with several captions per image: ``image_features [N, E]``, ``text_features [M, E]``,
    ``text_to_image [M]`` (the image of each caption). ``chance`` is text→image R@1 by chance, 1/N."""
    n, m = image_features.shape[0], text_features.shape[0]
    if n == 0 or m == 0 or text_to_image.shape != (m,):
        raise ValueError(
            f"need images and captions with one image index per caption, got {n}, {m}, {list(text_to_image.shape)}"
        )
    sims = image_features.float() @ text_features.float().T  # [N, M]
    owner = text_to_image.to(sims.device)
    truth_t2i = sims[owner, torch.arange(m, device=sims.device)]  # [M]
    rank_t2i = (sims > truth_t2i[None, :]).sum(0)
    is_own = owner[None, :] == torch.arange(n, device=sims.device)[:, None]  # [N, M]
    best_own = sims.masked_fill(~is_own, float("-inf")).max(1).values  # [N]
    rank_i2t = (sims.masked_fill(is_own, float("-inf")) > best_own[:, None]).sum(1)
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = float((rank_i2t < k).float().mean())
    for k in ks:
        out[f"text_to_image_R@{k}"] = float((rank_t2i < k).float().mean())
    out["num_images"] = n
    out["num_captions"] = m
    out["chance"] = 1.0 / n
    return out


def evaluate_retrieval(
    model,
    tokenizer,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    context_length: Optional[int] = None,
    batch_size: int = 256,
    autocast: Autocast = nullcontext,
) -> dict[str, float]:
    """Zero-shot retrieval on ``(images [N, 3, S, S], captions)`` pairs: recall@1/5 both ways."""
    if images.shape[0] != len(captions):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
    image_features = encode_images(model, images, batch_size=batch_size, autocast=autocast)
    text_features = encode_texts(
        model, tokenizer, captions, context_length=context_length, batch_size=batch_size, autocast=autocast
    )
    return retrieval_metrics(image_features, text_features)


# ---------------------------------------------------------------------- datasets
def load_karpathy(
    json_path: Union[str, os.PathLike], images: Union[str, os.PathLike], split: str = "test"
) -> tuple[list[Path], list[list[str]]]:
    """``(image files, captions per image)`` of one split of a Karpathy-format file."""
    data = read_json(json_path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise EvalInputError(f"{json_path}: expected an object with an 'images' list (Karpathy split format)")
    root = Path(images)
    if not root.is_dir():
        raise EvalInputError(f"--images {root}: not a folder")
    files, captions = [], []
    for k, entry in enumerate(entries):
        try:
            if entry.get("split") != split:
                continue
            name = entry["filename"]
            texts = [s["raw"] for s in entry["sentences"]]
        except (AttributeError, KeyError, TypeError) as err:
            raise EvalInputError(f"{json_path}: images[{k}] lacks filename/sentences[].raw ({err!r})") from err
        sub = root / entry["filepath"] / name if entry.get("filepath") else root / name
        files.append(sub if sub.exists() or not (root / name).exists() else root / name)
        captions.append([str(t) for t in texts])
    if not files:
        splits = sorted({str(e.get("split")) for e in entries if isinstance(e, dict)})
        raise EvalInputError(f"{json_path}: no images in split {split!r} (splits found: {splits})")
    return files, captions


@torch.no_grad()
def evaluate_retrieval_files(
    model,
    tokenizer,
    files: Sequence[Path],
    captions: Sequence[Sequence[str]],
    *,
    batch_size: int = 256,
    workers: int = 2,
    autocast: Autocast = nullcontext,
    progress: bool = True,
) -> dict:
    """Retrieval over image files, each with one or more captions; undecodable images are skipped."""
    device = device_of(model)
    batches, skipped = load_images(
        files,
        model.vision_cfg.image_size,
        batch_size=batch_size,
        workers=workers,
        device=device,
        progress="image features" if progress else None,
    )
    kept, feats = [], []
    for idx, images in batches:
        kept.append(idx)
        feats.append(encode_images(model, images, batch_size=batch_size, autocast=autocast))
    if not feats:
        raise EvalInputError(f"none of the {len(files)} images could be decoded (first: {files[0]})")
    kept_idx = torch.cat(kept).tolist()
    texts = [c for i in kept_idx for c in captions[i]]
    owner = torch.tensor([j for j, i in enumerate(kept_idx) for _ in captions[i]], dtype=torch.long)
    text_feats = encode_texts(model, tokenizer, texts, batch_size=batch_size, autocast=autocast)
    out = multi_caption_metrics(torch.cat(feats), text_feats, owner)
    out["skipped"] = skipped["image_decode"]
    if skipped["image_decode"]:
        log.warning("retrieval: skipped %d images that cannot be decoded", skipped["image_decode"])
    return out


@torch.no_grad()
def evaluate_retrieval_shards(
    model, tokenizer, shards: str, *, batch_size: int = 256, autocast: Autocast = nullcontext
) -> dict:
    """Retrieval over webdataset eval shards (a folder, a file or a brace pattern), one caption each."""
    from ..data import build_eval_pairs

    device = device_of(model)
    images, captions = build_eval_pairs(
        "webdataset", shards, image_size=model.vision_cfg.image_size, decoder="pil", device=device
    )
    if not captions:
        raise EvalInputError(f"{shards}: no usable image–caption pairs")
    image_features = encode_images(model, images, batch_size=batch_size, autocast=autocast)
    text_features = encode_texts(model, tokenizer, captions, batch_size=batch_size, autocast=autocast)
    return multi_caption_metrics(image_features, text_features, torch.arange(len(captions)))
