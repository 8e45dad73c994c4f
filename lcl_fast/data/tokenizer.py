"""The LCL text tokenizer: CLIP's byte-level BPE plus the three image tokens.

Gives the same ids as the reference (open_clip's ``SimpleTokenizer`` built with
``additional_special_tokens=["<img_placehold>", "<start_of_img>", "<end_of_img>"]``):

- text is cleaned with ``ftfy.fix_text``, HTML-unescaped twice, whitespace-collapsed and
  lower-cased; printable ASCII without ``&`` skips ftfy and unescaping, which cannot change it;
- it is split into words, numbers (one digit each), punctuation runs and whole special
  tokens; each piece is byte-encoded and merged with the 48 894 CLIP merges (the BPE result
  of every piece is kept in an LRU cache, so repeated words cost a dictionary look-up);
- ids 0–49 405 are CLIP's, then ``<start_of_text>`` 49 406, ``<end_of_text>`` 49 407,
  ``<img_placehold>`` 49 408, ``<start_of_img>`` 49 409, ``<end_of_img>`` 49 410; pad is 0.

The merges file (``bpe_simple_vocab_16e6.txt.gz``, OpenAI CLIP, MIT licence: see
``LICENSE-CLIP-BPE.txt``) ships as package data.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import numbers
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import ftfy
import numpy as np
import regex
import torch

DEFAULT_CONTEXT_LENGTH = 77
# Context length of each published configuration (the reference reads it from the model config).
MODEL_CONTEXT_LENGTHS = {
    "LCL_ViT-B-16_laion": 280,
    "LCL_ViT-B-32_laion": 128,
    "LCL_ViT-B-32_mmc4": 2048,
}
BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")

SOT, EOT = "<start_of_text>", "<end_of_text>"
IMG, SOI, EOI = "<img_placehold>", "<start_of_img>", "<end_of_img>"
SPECIAL_TOKENS = (SOT, EOT, IMG, SOI, EOI)
SPECIAL_TOKEN_IDS = {SOT: 49406, EOT: 49407, IMG: 49408, SOI: 49409, EOI: 49410}
VOCAB_SIZE = 49411
PAD_TOKEN_ID = 0  # also the id of "!": the reference treats it as padding all the same

# CLIP's vocabulary keeps the first 49152 - 256 - 2 merges of the file (after its header line).
_NUM_MERGES = 48_894
_END_OF_WORD = "</w>"
_BPE_CACHE_SIZE = 1 << 18  # distinct pieces kept; tens of MB at most

# Pieces: whole special tokens first, then English contractions, letter runs, single digits,
# runs of anything else that is not whitespace.
_PIECE = regex.compile(
    "|".join(regex.escape(t) for t in SPECIAL_TOKENS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# Anything but printable ASCII, tab, newline and carriage return, or an "&": text that
# ftfy.fix_text or html.unescape might change (anything else they return as it is).
_NEEDS_FIXING = re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


def clean_text(text: str) -> str:
    """The reference's text cleaning: ftfy, HTML unescaped twice, whitespace collapsed, lower case."""
    if _NEEDS_FIXING.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _byte_alphabet() -> list[tuple[int, str]]:
    """(byte, character) pairs in vocabulary order: printable Latin-1 bytes stand for themselves,
    the others (controls, space, soft hyphen) for the characters from U+0100 on, so that no BPE
    symbol contains whitespace."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    shown = set(printable)
    hidden = [b for b in range(256) if b not in shown]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + k)) for k, b in enumerate(hidden)]


class _ClipBpe:
    """The vocabulary and merge ranks of one merges file, shared by every tokenizer using it."""

    def __init__(self, path: Path):
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
        bad = [i for i, m in enumerate(merges) if len(m) != 2]
        if len(merges) != _NUM_MERGES or bad:
            raise ValueError(
                f"{path}: expected {_NUM_MERGES} merge lines of two symbols after the header, got "
                f"{len(merges)} lines ({len(bad)} malformed)"
            )
        alphabet = _byte_alphabet()
        self.char_of_byte = {b: c for b, c in alphabet}
        byte_of_char = {c: b for b, c in alphabet}
        symbols = [c for _, c in alphabet]
        symbols += [c + _END_OF_WORD for _, c in alphabet]
        symbols += [first + second for first, second in merges]
        symbols += SPECIAL_TOKENS
        self.id_of = {s: i for i, s in enumerate(symbols)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        # Bytes each id decodes to ("</w>" kept as its four bytes, turned into a space after decoding;
        # special tokens are printable ASCII, so they spell themselves).
        self.bytes_of_id = [bytes(byte_of_char[c] for c in s) for s in symbols]
        self.piece_ids = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(self._piece_ids)

    def _merge(self, word: str) -> list[str]:
        """Apply the merges to one byte-encoded word, lowest rank first, every occurrence left to right."""
        parts = [*word[:-1], word[-1] + _END_OF_WORD]
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, len(ranks)
            for pair in itertools.pairwise(parts):
                rank = ranks.get(pair, best_rank)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        if piece in SPECIAL_TOKENS:
            return (self.id_of[piece],)
        word = "".join(self.char_of_byte[b] for b in piece.encode("utf-8"))
        return tuple(self.id_of[s] for s in self._merge(word))


@functools.cache
def _load_bpe(path: str) -> _ClipBpe:
    return _ClipBpe(Path(path))


def _check_context_length(context_length: int) -> int:
    if (
        isinstance(context_length, bool)
        or not isinstance(context_length, numbers.Integral)
        or context_length < 2
    ):
        raise ValueError(
            f"context_length must be an int >= 2 (room for <start_of_text> and <end_of_text>), "
            f"got {context_length!r}"
        )
    return int(context_length)


class Tokenizer:
    """CLIP BPE with LCL's special tokens; see the module docstring.

    ``tok(texts, context_length)`` gives ``[n, context_length]`` int64 rows
    ``<start_of_text> ids <end_of_text> 0 …``; a row that does not fit is cut and its last slot
    set to ``<end_of_text>``. Pickles small (for data-loader workers); the merges file is read once
    per process and shared, with its BPE cache, by every tokenizer.
    """

    sot_token_id = 49406
    eot_token_id = 49407
    img_token_id = 49408
    soi_token_id = 49409
    eoi_token_id = 49410
    pad_token_id = PAD_TOKEN_ID

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, bpe_path: str | Path = BPE_PATH):
        self.context_length = _check_context_length(context_length)
        self.bpe_path = str(bpe_path)
        self._bpe = _load_bpe(self.bpe_path)
        self.vocab_size = len(self._bpe.id_of)
        found = {t: self._bpe.id_of[t] for t in SPECIAL_TOKENS}
        if found != SPECIAL_TOKEN_IDS or self.vocab_size != VOCAB_SIZE:
            raise ValueError(
                f"{bpe_path}: vocabulary of {self.vocab_size} ids with special tokens at {found}; "
                f"expected {VOCAB_SIZE} ids with {SPECIAL_TOKEN_IDS}"
            )
        self.special_token_ids = dict(SPECIAL_TOKEN_IDS)  # a copy: callers may edit theirs
        self._decoder: dict[int, str] | None = None

    def __reduce__(self):
        return (Tokenizer, (self.context_length, self.bpe_path))

    @property
    def encoder(self) -> Mapping[str, int]:
        """Token → id, as the reference tokenizer's ``encoder`` (BPE symbols, ``</w>`` ending a word, and
        the special tokens by name: ``tok.encoder["<start_of_img>"]``). Read-only."""
        return MappingProxyType(self._bpe.id_of)

    @property
    def decoder(self) -> dict[int, str]:
        """Id → token, the inverse of :attr:`encoder` (built on first use)."""
        if self._decoder is None:
            self._decoder = {i: t for t, i in self._bpe.id_of.items()}
        return self._decoder

    @property
    def all_special_ids(self) -> list[int]:
        return [SPECIAL_TOKEN_IDS[t] for t in SPECIAL_TOKENS]

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` (cleaned first), without ``<start_of_text>``/``<end_of_text>``."""
        piece_ids = self._bpe.piece_ids
        ids: list[int] = []
        for piece in _PIECE.findall(clean_text(text)):
            ids.extend(piece_ids(piece))
        return ids

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` as the reference writes it: every word followed by a space, special
        tokens spelled out, pad (0) shown as "!", invalid UTF-8 replaced by U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one sequence of ids, got a tensor of shape {tuple(ids.shape)}"
                )
            ids = ids.tolist()
        bytes_of_id = self._bpe.bytes_of_id
        wrong = [i for i in ids if not 0 <= i < self.vocab_size]
        if wrong:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {wrong[:5]}")
        raw = b"".join(bytes_of_id[i] for i in ids)
        return raw.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ")

    def _rows(self, texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        texts = list(texts)
        wrong = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if wrong:
            raise TypeError(f"texts must be strings; item {wrong[0]} is a {type(texts[wrong[0]]).__name__}")
        return texts

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[len(texts), context_length]`` int64 ids: ``<sot> text <eot>``, zero padded, the last
        slot forced to ``<eot>`` when cut (``context_length`` defaults to the tokenizer's)."""
        texts = self._rows(texts)
        length = self.context_length if context_length is None else _check_context_length(context_length)
        # Filled through numpy: a list-to-row copy there costs a tenth of torch's.
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text)]
            del ids[length - 1 :]
            ids.append(self.eot_token_id)
            out[row, : len(ids)] = ids
        return torch.from_numpy(out)

    def for_retrieval(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Ids for text features (retrieval, zero-shot): ``<sot> text <start_of_img>``, zero padded,
        ``<start_of_img>`` forced into the last slot when cut. As in the reference (which tokenizes,
        then replaces every ``<end_of_text>`` by ``<start_of_img>``), a literal ``<end_of_text>`` in
        the text becomes ``<start_of_img>`` too."""
        ids = self(texts, context_length)
        ids[ids == self.eot_token_id] = self.soi_token_id
        return ids


def tokenizer_from_config(config: Mapping | None = None, *, context_length: int | None = None) -> Tokenizer:
    """The tokenizer of a model configuration (a dict as :func:`lcl_fast.get_model_config` returns).

    Its ``text_cfg.context_length`` becomes the default length (None: 77; ``context_length`` overrides
    both), and its ``special_token_ids``, when given, must be those of the vocabulary.
    """
    default = DEFAULT_CONTEXT_LENGTH
    if config is not None:
        default = config.get("text_cfg", {}).get("context_length", DEFAULT_CONTEXT_LENGTH)
        ids = dict(config.get("special_token_ids") or {})
        wrong = {t: i for t, i in ids.items() if SPECIAL_TOKEN_IDS.get(t) != i}
        if wrong:
            raise ValueError(
                f"the model config's special_token_ids {wrong} differ from the vocabulary's {SPECIAL_TOKEN_IDS}"
            )
    return Tokenizer(default if context_length is None else context_length)


def get_tokenizer(
    name: str | dict | None = None, *, context_length: int | None = None, **_open_clip_kwargs
) -> Tokenizer:
    """The LCL tokenizer, looked up like :func:`lcl_fast.create_model` looks up a model.

    ``name``: a shipped or registered configuration (``lcl_fast.list_models()``, including those added
    with ``lcl_fast.add_model_config``), a JSON config path, or a config dict; its
    ``text_cfg.context_length`` becomes the default length (:func:`tokenizer_from_config`). None: 77.
    ``context_length`` overrides both. Keyword arguments open_clip passes from ``text_cfg.tokenizer_kwargs``
    (``additional_special_tokens``) are accepted: LCL's image tokens are always part of the vocabulary.
    """
    config = None
    if name is not None:
        from ..model_configs import get_model_config  # the configuration registry: the bottom layer

        config = get_model_config(name)  # an unknown name is an error, even with an explicit length
    return tokenizer_from_config(config, context_length=context_length)


def text_features_ids(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
) -> torch.Tensor:
    """``get_tokenizer().for_retrieval(texts, context_length)``: ids whose ``<start_of_img>``
    position gives the text feature (REFERENCE.md, "Text features for retrieval and zero-shot")."""
    return get_tokenizer(context_length=context_length).for_retrieval(texts)
