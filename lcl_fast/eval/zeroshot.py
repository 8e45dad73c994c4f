"""Zero-shot classification: an ImageNet-style folder scored against prompt-ensemble text features.

A folder with one sub-folder per class (``classnames.txt`` beside them, one name per line in
sorted-folder order, overrides the folder names); prompts from templates (the CLIP paper's 80
ImageNet templates by default). Under torch.distributed each rank takes a share of the images.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .common import Autocast, EvalInputError, device_of, encode_images, encode_texts, image_folder, log, progress_bar

# The CLIP paper's prompt ensemble for ImageNet (80 templates).
OPENAI_IMAGENET_TEMPLATES = tuple(
    t + "."
    for t in (
        "a bad photo of a {}",
        "a photo of many {}",
        "a sculpture of a {}",
        "a photo of the hard to see {}",
        "a low resolution photo of the {}",
        "a rendering of a {}",
        "graffiti of a {}",
        "a bad photo of the {}",
        "a cropped photo of the {}",
        "a tattoo of a {}",
        "the embroidered {}",
        "a photo of a hard to see {}",
        "a bright photo of a {}",
        "a photo of a clean {}",
        "a photo of a dirty {}",
        "a dark photo of the {}",
        "a drawing of a {}",
        "a photo of my {}",
        "the plastic {}",
        "a photo of the cool {}",
        "a close-up photo of a {}",
        "a black and white photo of the {}",
        "a painting of the {}",
        "a painting of a {}",
        "a pixelated photo of the {}",
        "a sculpture of the {}",
        "a bright photo of the {}",
        "a cropped photo of a {}",
        "a plastic {}",
        "a photo of the dirty {}",
        "a jpeg corrupted photo of a {}",
        "a blurry photo of the {}",
        "a photo of the {}",
        "a good photo of the {}",
        "a rendering of the {}",
        "a {} in a video game",
        "a photo of one {}",
        "a doodle of a {}",
        "a close-up photo of the {}",
        "a photo of a {}",
        "the origami {}",
        "the {} in a video game",
        "a sketch of a {}",
        "a doodle of the {}",
        "a origami {}",
        "a low resolution photo of a {}",
        "the toy {}",
        "a rendition of the {}",
        "a photo of the clean {}",
        "a photo of a large {}",
        "a rendition of a {}",
        "a photo of a nice {}",
        "a photo of a weird {}",
        "a blurry photo of a {}",
        "a cartoon {}",
        "art of a {}",
        "a sketch of the {}",
        "a embroidered {}",
        "a pixelated photo of a {}",
        "itap of the {}",
        "a jpeg corrupted photo of the {}",
        "a good photo of a {}",
        "a plushie {}",
        "a photo of the nice {}",
        "a photo of the small {}",
        "a photo of the weird {}",
        "the cartoon {}",
        "art of the {}",
        "a drawing of the {}",
        "a photo of the large {}",
        "a black and white photo of a {}",
        "the plushie {}",
        "a dark photo of a {}",
        "itap of a {}",
        "graffiti of the {}",
        "a toy {}",
        "itap of my {}",
        "a photo of a cool {}",
        "a photo of a small {}",
        "a tattoo of the {}",
    )
)
# The seven-template subset of the CLIP notebook: a tenth of the cost, nearly the same accuracy.
SIMPLE_IMAGENET_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
TEMPLATE_SETS = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}


# ---------------------------------------------------------------------- zero-shot classification
def load_templates(spec: Union[str, Sequence[str]]) -> list[str]:
    """``"openai"``, ``"simple"``, a file with one template per line, or a list; each has one ``{}``."""
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            templates = list(TEMPLATE_SETS[spec])
        elif os.path.isfile(spec):
            templates = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        else:
            raise ValueError(f"templates {spec!r}: not one of {sorted(TEMPLATE_SETS)} and not a file")
    else:
        templates = list(spec)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"every template needs exactly one '{{}}' for the class name; bad: {bad[:3]}")
    return templates


@torch.no_grad()
def zero_shot_classifier(
    model,
    tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    context_length: Optional[int] = None,
    batch_size: int = 256,
    autocast: Autocast = nullcontext,
) -> torch.Tensor:
    """``[E, C]``: per class, the mean of its normalised prompt features, normalised again (as open_clip)."""
    prompts = [t.format(name) for name in classnames for t in templates]
    feats = encode_texts(
        model, tokenizer, prompts, context_length=context_length, batch_size=batch_size, autocast=autocast
    )
    per_class = feats.view(len(classnames), len(templates), -1).mean(1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def _rank_share(n: int, rank: int, world: int) -> tuple[list[int], list[bool]]:
    """Indices of this rank's share, padded so every rank runs the same number of items (FSDP-safe)."""
    per_rank = -(-n // world)
    idx = list(range(rank * per_rank, min(n, (rank + 1) * per_rank)))
    valid = [True] * len(idx)
    while len(idx) < per_rank:
        idx.append(idx[-1] if idx else 0)
        valid.append(False)
    return idx, valid


def _decode_chunk(
    files: Sequence[Path], image_size: int, decoder: str, device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Eval-transformed images of ``files``; one that cannot be read or decoded becomes zeros and is listed."""
    from ..data import decode_batch

    try:
        return decode_batch(
            [f.read_bytes() for f in files], image_size, train=False, backend=decoder, device=device
        ), []
    except (OSError, ValueError):
        pass
    images, bad = [], []
    for j, f in enumerate(files):
        try:
            images.append(decode_batch([f.read_bytes()], image_size, train=False, backend=decoder, device=device))
        except (OSError, ValueError) as err:
            log.warning("skipped an image that cannot be decoded: %s: %s", f, err)
            images.append(torch.zeros(1, 3, image_size, image_size, device=device))
            bad.append(j)
    return torch.cat(images), bad


@torch.no_grad()
def evaluate_zero_shot(
    model,
    tokenizer,
    root: Union[str, os.PathLike],
    *,
    templates: Union[str, Sequence[str]] = "openai",
    image_size: Optional[int] = None,
    context_length: Optional[int] = None,
    batch_size: int = 256,
    autocast: Autocast = nullcontext,
    decoder: str = "auto",
    max_images: Optional[int] = None,
    progress: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 zero-shot accuracy on an ImageNet-style folder. Under torch.distributed each rank
    takes a share of the images (every rank must call it)."""
    files, labels, names = image_folder(root)
    if max_images is not None:
        files, labels = files[:max_images], labels[:max_images]
    classifier = zero_shot_classifier(
        model,
        tokenizer,
        names,
        load_templates(templates),
        context_length=context_length,
        batch_size=batch_size,
        autocast=autocast,
    )
    image_size = image_size or model.vision_cfg.image_size
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    idx, valid = _rank_share(len(files), rank, world)
    device = device_of(model)
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images, skipped
    k = min(5, len(names))
    bar = progress_bar(len(idx), "zero-shot") if progress else None
    for start in range(0, len(idx), batch_size):
        chunk, ok = (
            idx[start : start + batch_size],
            torch.tensor(valid[start : start + batch_size], device=device),
        )
        images, bad = _decode_chunk([files[i] for i in chunk], image_size, decoder, device)
        if bad:  # undecodable images are skipped (and counted), as in training
            ok[bad] = False
            counts[3] += len(set(bad) & {j for j, v in enumerate(valid[start : start + batch_size]) if v})
        logits = encode_images(model, images, batch_size=batch_size, autocast=autocast) @ classifier
        target = torch.tensor([labels[i] for i in chunk], device=device)
        top = logits.topk(k, dim=1).indices
        counts[0] += ((top[:, 0] == target) & ok).sum()
        counts[1] += ((top == target[:, None]).any(1) & ok).sum()
        counts[2] += ok.sum()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    if distributed:
        dist.all_reduce(counts)
    hits1, hits5, n, skipped = counts.tolist()
    if skipped:
        log.warning("zero-shot: skipped %d images of %s that cannot be decoded", int(skipped), root)
    if not n:
        raise EvalInputError(f"{root}: none of its {len(files)} images could be decoded")
    return {
        "zeroshot_top1": hits1 / n,
        f"zeroshot_top{k}": hits5 / n,
        "zeroshot_images": int(n),
        "zeroshot_classes": len(names),
        "zeroshot_chance": 1.0 / len(names),
        "zeroshot_skipped": int(skipped),
    }
