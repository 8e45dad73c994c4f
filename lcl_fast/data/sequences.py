"""The reference's sequence rules (REFERENCE.md, "Building sequences"), as pure functions.

Every image occupies ``<start_of_img>``, ``num_img_token`` × ``<img_placehold>``, ``<end_of_img>``.

- **Paired** rows (:class:`PairedSequenceBuilder`): caption ids (no start/end) cut to
  ``C - N - 4``; with probability ``img_first_prob`` the row is ``[image] caption <eot>``,
  otherwise ``<sot> caption [image]``.
- **Interleaved** documents: :func:`select_mmc4_images` keeps images with ``matched_sim >= 0.24``,
  sorts them by matched sentence (stable), keeps one per sentence (random choice among
  duplicates) and at most 6. After the images that fail to load are dropped,
  :func:`build_interleaved` places each image before (probability ``img_first_prob``) or after
  its sentence, writes ``<sot> ... <eot>`` cut to the context length with ``<eot>`` kept last,
  cuts the sequence at the ``<start_of_img>`` of an image whose run was cut (``<eot>`` there),
  and returns None when fewer than ``min_images`` images remain.

The reference joins the sentences (with the image token strings spliced in) by spaces and
tokenizes the whole text; here each sentence is encoded on its own and the ids concatenated,
which gives the same ids (the CLIP tokenizer never makes a token across whitespace) and lets a
long document stop encoding once the context is full. Randomness comes from the ``rng``
argument (a ``random.Random`` per sample), so a sample's row depends only on its seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:
    import torch

SIM_THRESHOLD = 0.24
MAX_IMAGES = 6
MIN_IMAGES = 1


class TokenizerLike(Protocol):
    sot_token_id: int
    eot_token_id: int
    img_token_id: int
    soi_token_id: int
    eoi_token_id: int

    def encode(self, text: str) -> list[int]: ...


def image_run(tokenizer: TokenizerLike, num_img_token: int) -> list[int]:
    """``<start_of_img>``, ``num_img_token`` × ``<img_placehold>``, ``<end_of_img>``."""
    return [tokenizer.soi_token_id, *([tokenizer.img_token_id] * num_img_token), tokenizer.eoi_token_id]


def _check_lengths(context_length: int, num_img_token: int, needed: int) -> None:
    if num_img_token < 1 or context_length < needed:
        raise ValueError(
            f"context_length {context_length} and num_img_token {num_img_token}: need num_img_token >= 1 "
            f"and context_length >= num_img_token + 4 = {needed}"
        )


class PairedSequenceBuilder:
    """Rows for image–caption pairs: ``builder(caption, rng) -> list[int]`` (unpadded, <= C)."""

    def __init__(
        self, tokenizer: TokenizerLike, context_length: int, num_img_token: int, img_first_prob: float = 0.5
    ):
        _check_lengths(context_length, num_img_token, num_img_token + 4)
        if not 0.0 <= img_first_prob <= 1.0:
            raise ValueError(f"img_first_prob must lie in [0, 1], got {img_first_prob}")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.text_length = context_length - num_img_token - 4  # room for <sot>, <eot>, <soi>, <eoi>
        self.img_first_prob = img_first_prob
        self.run = image_run(tokenizer, num_img_token)

    def __call__(self, caption: str, rng: random.Random) -> list[int]:
        ids = self.tokenizer.encode(caption)[: self.text_length]
        if rng.random() < self.img_first_prob:
            return [*self.run, *ids, self.tokenizer.eot_token_id]
        return [self.tokenizer.sot_token_id, *ids, *self.run]


def select_mmc4_images(
    image_info: Sequence[Any],
    num_sentences: int,
    rng: random.Random,
    *,
    sim_threshold: float = SIM_THRESHOLD,
    max_images: int = MAX_IMAGES,
) -> tuple[list[tuple[int, Any]], int]:
    """``([(sentence index, image name), ...], number of malformed entries)`` for one MMC4 document.

    Keeps entries with ``matched_sim >= sim_threshold``, sorted by sentence (stable), one per
    sentence (``rng.randrange`` among duplicates, one draw per sentence), the first ``max_images``.
    Entries that are not dicts, lack the fields or point past the last sentence are counted
    as malformed and left out (the reference would crash on them).
    """
    kept: list[tuple[int, Any]] = []
    malformed = 0
    for info in image_info:
        try:
            ix, sim, name = info["matched_text_index"], float(info["matched_sim"]), info["image_name"]
        except (TypeError, KeyError, ValueError):
            malformed += 1
            continue
        if isinstance(ix, bool) or not isinstance(ix, int) or not 0 <= ix < num_sentences:
            malformed += 1
            continue
        if sim >= sim_threshold:
            kept.append((ix, name))
    kept.sort(key=lambda item: item[0])  # stable, as the reference's sort on the index alone
    chosen: list[tuple[int, Any]] = []
    start = 0
    while start < len(kept):
        stop = start
        while stop < len(kept) and kept[stop][0] == kept[start][0]:
            stop += 1
        chosen.append(kept[start + rng.randrange(stop - start)])
        start = stop
    return chosen[:max_images], malformed


class InterleavedSequenceBuilder:
    """Rows for interleaved documents; see the module docstring."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        context_length: int,
        num_img_token: int,
        img_first_prob: float = 0.5,
        *,
        min_images: int = MIN_IMAGES,
    ):
        _check_lengths(context_length, num_img_token, num_img_token + 4)
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.num_img_token = num_img_token
        self.img_first_prob = img_first_prob
        self.min_images = min_images
        self.run = image_run(tokenizer, num_img_token)

    def placements(self, num_images: int, rng: random.Random) -> list[bool]:
        """For each image, whether it goes before its sentence (one ``rng.random()`` each)."""
        return [rng.random() < self.img_first_prob for _ in range(num_images)]

    def from_sentences(
        self, sentences: Sequence[str], image_sentences: Sequence[int], before: Sequence[bool]
    ) -> Optional[tuple[list[int], int]]:
        """MMC4: images attached to sentences (sorted, one per sentence) -> ``(ids, images kept)``."""
        where = dict(zip(image_sentences, before))
        pieces: list[Any] = []
        for k, sentence in enumerate(sentences):
            first = where.get(k)
            if first is True:
                pieces.append(None)
            pieces.append(sentence)
            if first is False:
                pieces.append(None)
        return self.from_pieces(pieces)

    def from_pieces(self, pieces: Sequence[Optional[str]]) -> Optional[tuple[list[int], int]]:
        """A document as texts and images (None) in order -> ``(ids, images kept)`` or None.

        ``ids`` is ``<sot> ... <eot>`` (unpadded, at most ``context_length`` long) after the
        truncation rule; the kept images are the first ``images kept`` of the document.
        """
        tok, limit = self.tokenizer, self.context_length - 2
        body: list[int] = []
        for piece in pieces:
            if len(body) > limit:  # all that follows is cut
                break
            body.extend(self.run if piece is None else tok.encode(piece))
        ids = [tok.sot_token_id, *body[:limit], tok.eot_token_id]
        n_soi = ids.count(tok.soi_token_id)
        if n_soi < self.min_images:
            return None
        if n_soi * self.num_img_token != ids.count(tok.img_token_id):
            # The cut went through an image run: end the sequence at that image's <start_of_img>.
            last = len(ids) - 1 - ids[::-1].index(tok.soi_token_id)
            ids = [*ids[:last], tok.eot_token_id]
            n_soi -= 1
            if n_soi < self.min_images:
                return None
        return ids, n_soi


def build_paired_text(
    tokenizer: TokenizerLike,
    captions: str | Sequence[str],
    num_img_token: int,
    *,
    image_first: bool | Sequence[bool] = False,
    context_length: Optional[int] = None,
) -> torch.Tensor:
    """Text ids for image–caption pairs, one image per caption, as ``model(images, text_ids)`` takes them.

    ``tokenizer``: :func:`lcl_fast.get_tokenizer`'s (or any with the special-token ids and ``encode``);
    ``num_img_token``: the model's ``model.num_img_token`` (image latents per image). Row ``i`` holds
    caption ``i`` and the ``<img_placehold>`` run of image ``i``, the layout training uses
    (:class:`PairedSequenceBuilder`): ``<sot> caption <start_of_img> <img_placehold>… <end_of_img>``
    (the default: the text before the image gives the contrastive pair, and the caption is learned
    as text), or with ``image_first`` ``<start_of_img> … <end_of_img> caption <eot>`` (captioning:
    the caption is predicted from the image; no contrastive pair). ``image_first`` may be one bool
    per caption. Captions are cut to ``context_length - num_img_token - 4`` ids; rows are padded with
    0 to ``context_length`` (default: the tokenizer's). Returns ``[len(captions), context_length]`` int64.
    """
    import torch

    captions = [captions] if isinstance(captions, str) else list(captions)
    wrong = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if wrong:
        raise TypeError(f"captions must be strings; item {wrong[0]} is a {type(captions[wrong[0]]).__name__}")
    firsts = [bool(image_first)] * len(captions) if isinstance(image_first, bool) else list(image_first)
    if len(firsts) != len(captions):
        raise ValueError(f"image_first has {len(firsts)} entries for {len(captions)} captions")
    length = int(context_length if context_length is not None else tokenizer.context_length)
    rows = [
        PairedSequenceBuilder(tokenizer, length, num_img_token, img_first_prob=float(first))(caption, random.Random(0))
        for caption, first in zip(captions, firsts)
    ]
    out = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out
