"""Text generation from LCL's own causal model: image first, then a caption, with a KV cache.

A caption is generated the way LCL trains its image-first pairs: the row is
``<start_of_img>, N × <img_placehold>, <end_of_img>``, then optional prompt ids, and the model
continues with ``lm_head`` until it writes ``<end_of_text>`` (the paired rows carry no
``<start_of_text>`` after an image, so none is inserted here either).

The text tower's blocks are run here functionally, from the model's own modules and weights
(``ln_1`` → ``in_proj`` → attention over the cache → ``out_proj`` → ``ls_1``, ``ln_2`` →
``mlp`` → ``ls_2``), so a decoding step attends from one new token to the cached keys and
values instead of re-running the whole prefix. ``use_cache=False`` recomputes the prefix at
every step (the oracle the cached path is tested against, token for token).

Ragged prompts are left-padded; each row's position ids count its own tokens only, so a row
sees exactly the positions it would see alone (as in training, where the position of a token is
its index in its row). Left pads are masked out as keys.

Decoding never emits the pad id 0 (never a training label), ``<start_of_text>`` or the three
image tokens (an image cannot follow without pixels). Greedy decoding is ``num_beams=1``; beam
search keeps ``num_beams`` hypotheses per image, scores finished ones by summed log-probability
divided by ``length ** length_penalty`` and stops an image once ``num_beams`` hypotheses have
finished (so ``num_beams=1`` is greedy decoding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F

__all__ = ["caption", "generate"]

PromptIds = Union[None, torch.Tensor, Sequence[Sequence[int]]]


# ---------------------------------------------------------------------- the text tower, functionally
def _num_heads(attn: torch.nn.Module) -> int:
    heads = getattr(attn, "num_heads", None) or getattr(attn, "heads", None)
    if not heads:
        raise TypeError(f"cannot tell the number of heads of {type(attn).__name__}")
    return int(heads)


class _KVCache:
    """Keys and values of every layer, ``[rows, heads, max_len, head_dim]``, filled left to right."""

    def __init__(self, layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[Optional[torch.Tensor]] = [None] * layers
        self.v: list[Optional[torch.Tensor]] = [None] * layers
        self.length = 0  # slots filled (the same for every row: ragged rows are left-padded)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            rows, heads, _, dim = k.shape
            self.k[layer] = k.new_empty(rows, heads, self.max_len, dim)
            self.v[layer] = v.new_empty(rows, heads, self.max_len, dim)
        stop = start + k.shape[2]
        self.k[layer][:, :, start:stop] = k
        self.v[layer][:, :, start:stop] = v
        return self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep ``rows`` (beam search: each new beam continues the cache of its parent beam)."""
        self.k = [None if t is None else t.index_select(0, rows) for t in self.k]
        self.v = [None if t is None else t.index_select(0, rows) for t in self.v]


def _block(block: torch.nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor], cache, layer: int, start: int):
    """One pre-norm residual block on ``x [B, L, W]``; ``mask [B, 1, L, T]`` (True: attend)."""
    attn = block.attn
    batch, length, width = x.shape
    heads = _num_heads(attn)
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    if cache is not None:
        k, v = cache.write(layer, k, v, start)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(batch, length, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _run_blocks(model, embs: torch.Tensor, positions: torch.Tensor, mask, cache, start: int) -> torch.Tensor:
    """Token embeddings ``[B, L, W]`` at ``positions [B, L]`` → the last block's output ``[B, L, W]``."""
    x = embs + model.text.positional_embedding.to(embs.dtype)[positions]
    for layer, block in enumerate(model.text.transformer.resblocks):
        x = _block(block, x, mask, cache, layer, start)
    return x


def _full_mask(valid: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, 1, L, L]``: causal over real tokens (``valid [B, L]``); each token always sees itself, so a
    left pad's (unused) row is never empty; ``image [B, L]`` lets image latents see each other."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    mask = causal & valid[:, None, :]
    if image is not None:
        mask = mask | (image[:, :, None] & image[:, None, :])
    return (mask | torch.eye(length, dtype=torch.bool, device=valid.device))[:, None]


# ---------------------------------------------------------------------- inputs
def _prompt_lists(prompt_ids: PromptIds, batch: int, pad_id: int) -> list[list[int]]:
    if prompt_ids is None:
        return [[] for _ in range(batch)]
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be [batch, length] (0 = padding), got {list(prompt_ids.shape)}")
        rows = [[int(t) for t in row if int(t) != pad_id] for row in prompt_ids.tolist()]
    else:
        rows = [[int(t) for t in row] for row in prompt_ids]
    if len(rows) != batch:
        raise ValueError(f"{len(rows)} prompts for {batch} images")
    return rows


class _State:
    """Everything the decoding loop carries per row; beam search reorders it."""

    def __init__(self, model, images: torch.Tensor, prompts: list[list[int]], max_new_tokens: int, use_cache: bool):
        ids_cfg = model.special_token_ids
        self.model = model
        n_img = model.num_img_token
        run = [ids_cfg["<start_of_img>"], *([ids_cfg["<img_placehold>"]] * n_img), ids_cfg["<end_of_img>"]]
        rows = [run + p for p in prompts]
        width = max(len(r) for r in rows)
        device = images.device
        tokens = torch.full((len(rows), width), model.pad_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for i, r in enumerate(rows):  # left-pad: every row's last prefix token sits in the last column
            tokens[i, width - len(r) :] = torch.tensor(r, device=device)
            valid[i, width - len(r) :] = True
        self.positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        self.valid = valid
        self.is_image = tokens == ids_cfg["<img_placehold>"]
        # Embeddings of the prefix: the image's latents spliced in at its placeholders (row-major).
        dtype = getattr(model, "cast_dtype", None) or model.text.token_embedding.weight.dtype
        _, image_embs = model.pool_project(model.visual(images))
        embs = model.text.token_embedding(tokens.masked_fill(self.is_image, 0)).to(dtype)
        self.prefix_embs = embs.masked_scatter(self.is_image.unsqueeze(-1), image_embs.to(embs.dtype))
        self.generated = tokens.new_zeros(len(rows), 0)
        self.next_position = self.positions[:, -1] + 1
        layers = len(model.text.transformer.resblocks)
        self.cache = _KVCache(layers, width + max_new_tokens) if use_cache else None
        # The LM head's weight transposed once per call: every step projects onto the whole vocabulary.
        head = model.lm_head
        plain = isinstance(head, torch.nn.Sequential) and len(head) == 2 and isinstance(head[1], torch.nn.Linear)
        self._head_t = head[1].weight.detach().T.contiguous() if plain else None

    def select(self, rows: torch.Tensor) -> None:
        for name in ("positions", "valid", "is_image", "prefix_embs", "generated", "next_position"):
            setattr(self, name, getattr(self, name).index_select(0, rows))
        if self.cache is not None:
            self.cache.reorder(rows)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, V]`` logits, at least float32: a fresh tensor, which the callers mask in place."""
        head = self.model.lm_head
        if self._head_t is None:
            logits = head(hidden)
        else:  # LayerNorm, then ``x @ W.T`` against a contiguous ``W.T`` (2.4x F.linear's speed on CPU)
            logits = head[0](hidden).to(self._head_t.dtype) @ self._head_t
            if head[1].bias is not None:
                logits = logits + head[1].bias
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def prefill(self) -> torch.Tensor:
        """Log-probabilities ``[B, V]`` of the first new token."""
        image = self.is_image if getattr(self.model, "image_bidirectional", False) else None
        mask = _full_mask(self.valid, image)
        hidden = _run_blocks(self.model, self.prefix_embs, self.positions, mask, self.cache, 0)
        if self.cache is not None:
            self.cache.length = self.valid.shape[1]
        return self._logits(hidden[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens [B]``; log-probabilities ``[B, V]`` of the token after them."""
        self.generated = torch.cat([self.generated, tokens[:, None]], 1)
        self.valid = F.pad(self.valid, (0, 1), value=True)
        self.is_image = F.pad(self.is_image, (0, 1), value=False)
        self.positions = torch.cat([self.positions, self.next_position[:, None]], 1)
        self.next_position = self.next_position + 1
        model = self.model
        if self.cache is None:  # recompute everything: the oracle
            new = model.text.token_embedding(self.generated).to(self.prefix_embs.dtype)
            embs = torch.cat([self.prefix_embs, new], 1)
            image = self.is_image if getattr(model, "image_bidirectional", False) else None
            hidden = _run_blocks(model, embs, self.positions, _full_mask(self.valid, image), None, 0)
            return self._logits(hidden[:, -1])
        start = self.cache.length
        embs = model.text.token_embedding(tokens[:, None]).to(self.prefix_embs.dtype)
        mask = self.valid[:, None, None, :]  # one query: causal by construction, left pads masked
        hidden = _run_blocks(model, embs, self.positions[:, -1:], mask, self.cache, start)
        self.cache.length = start + 1
        return self._logits(hidden[:, -1])


def _suppressed(model) -> list[int]:
    ids = model.special_token_ids
    return [model.pad_id, ids["<start_of_text>"], ids["<img_placehold>"], ids["<start_of_img>"], ids["<end_of_img>"]]


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    logits[:, banned] = float("-inf")
    return torch.log_softmax(logits, dim=-1)


# ---------------------------------------------------------------------- decoding
def _greedy(state: _State, max_new_tokens: int, eot: int, pad: int, banned: list[int]) -> list[list[int]]:
    def best(logits: torch.Tensor) -> torch.Tensor:  # argmax of the logits is argmax of the log-probabilities
        logits[:, banned] = float("-inf")
        # max(dim).indices is argmax (the first maximal index on ties) at a third of argmax's CPU time
        return logits.max(-1).indices

    nxt = best(state.prefill())
    batch = nxt.shape[0]
    finished = torch.zeros(batch, dtype=torch.bool, device=nxt.device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out.append(nxt)
        finished |= nxt == eot
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        nxt = best(state.step(nxt))
    rows = torch.stack(out, 1).tolist() if out else [[] for _ in range(batch)]
    return [r[: r.index(eot) + 1] if eot in r else r for r in rows]


def _beam(
    state: _State, max_new_tokens: int, beams: int, eot: int, banned: list[int], length_penalty: float
) -> list[list[int]]:
    logp = _log_probs(state.prefill(), banned)
    batch, vocab = logp.shape
    device = logp.device
    state.select(torch.arange(batch, device=device).repeat_interleave(beams))
    logp = logp.repeat_interleave(beams, 0)
    # Only the first beam of each image is live at the start, so the first step's candidates differ.
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    for step in range(max_new_tokens):
        total = (scores.view(-1, 1) + logp).view(batch, beams * vocab)
        top_scores, top_index = total.topk(2 * beams, dim=1)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        top_scores = top_scores.tolist()
        generated = state.generated.tolist()
        new_rows, new_tokens, new_scores = [], [], []
        for b in range(batch):
            live: list[tuple[int, int, float]] = []
            for rank, (parent, token, score) in enumerate(zip(parents[b], tokens[b], top_scores[b])):
                if done[b] or score == float("-inf"):
                    break
                if token == eot:
                    if rank < beams:  # a finished hypothesis only counts among the best `beams`
                        seq = generated[b * beams + parent] + [eot]
                        finished[b].append((score / len(seq) ** length_penalty, seq))
                elif len(live) < beams:
                    live.append((parent, token, score))
                if len(live) == beams:
                    break
            done[b] = done[b] or len(finished[b]) >= beams or not live
            if done[b]:  # keep the shapes: beam 0 repeated, never read again
                live = [(0, eot, float("-inf"))] * beams
            while len(live) < beams:
                live.append((live[0][0], live[0][1], float("-inf")))
            for parent, token, score in live:
                new_rows.append(b * beams + parent)
                new_tokens.append(token)
                new_scores.append(score)
        if all(done):
            break
        state.select(torch.tensor(new_rows, device=device))
        scores = torch.tensor(new_scores, device=device).view(batch, beams)
        tokens_t = torch.tensor(new_tokens, device=device)
        if step + 1 == max_new_tokens:
            state.generated = torch.cat([state.generated, tokens_t[:, None]], 1)
            break
        logp = _log_probs(state.step(tokens_t), banned)
    generated = state.generated.tolist()
    results = []
    for b in range(batch):
        if not done[b]:  # out of tokens: the live beams compete with what finished
            for k in range(beams):
                score = float(scores[b, k])
                if score > float("-inf"):
                    seq = generated[b * beams + k]
                    finished[b].append((score / max(1, len(seq)) ** length_penalty, seq))
        best = max(finished[b], key=lambda item: item[0]) if finished[b] else (0.0, [])
        results.append(best[1])
    return results


@torch.no_grad()
def generate(
    model,
    images: torch.Tensor,
    prompt_ids: PromptIds = None,
    *,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    use_cache: bool = True,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Generate text after each image: ``images [B, 3, S, S]`` → new token ids ``[B, T]``.

    ``prompt_ids``: None, a list of B id lists (ragged), or ``[B, P]`` with 0 as padding; the ids
    go right after the image's ``<end_of_img>``. Each row of the result holds the generated ids up
    to and including its first ``<end_of_text>``, then 0 (padding); ``T`` is the longest row.
    ``max_new_tokens`` is cut to what the context length leaves after the longest prefix.
    """
    size = model.vision_cfg.image_size
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"images must be [batch, 3, {size}, {size}] for this model, got {list(images.shape)}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    batch = images.shape[0]
    prompts = _prompt_lists(prompt_ids, batch, model.pad_id)
    vocab = model.text.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt ids must lie in [0, {vocab}), got {bad[:5]}")
    prefix = model.num_img_token + 2 + max((len(p) for p in prompts), default=0)
    room = model.text.context_length - prefix
    if room < 1:
        raise ValueError(
            f"the image ({model.num_img_token + 2} tokens) and prompt fill the context length "
            f"{model.text.context_length}: no room to generate"
        )
    max_new_tokens = min(max_new_tokens, room)
    if batch == 0 or max_new_tokens == 0:
        return torch.zeros(batch, 0, dtype=torch.long, device=images.device)
    was_training = model.training
    model.eval()
    try:
        state = _State(model, images, prompts, max_new_tokens, use_cache)
        eot, banned = model.eot_id, _suppressed(model)
        if num_beams == 1:
            rows = _greedy(state, max_new_tokens, eot, model.pad_id, banned)
        else:
            rows = _beam(state, max_new_tokens, num_beams, eot, banned, length_penalty)
    finally:
        model.train(was_training)
    out = torch.full((batch, max(len(r) for r in rows)), model.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(images.device)


def caption(
    model,
    tokenizer,
    images: Any,
    *,
    prompt: Union[None, str, Sequence[str]] = None,
    max_new_tokens: int = 32,
    num_beams: int = 1,
    batch_size: int = 64,
    use_cache: bool = True,
    decode: Optional[Callable[[Any], torch.Tensor]] = None,
) -> list[str]:
    """Captions of ``images``: a normalised ``[N, 3, S, S]`` tensor, or anything ``decode(images)`` turns
    into one (:func:`lcl_fast.caption` passes the data layer's decoder: PIL images, bytes or paths).

    ``prompt`` (one string for all, or one per image) is written after the image and continued;
    the returned strings are the continuations, without ``<end_of_text>``.
    """
    if isinstance(images, torch.Tensor):
        batch = images
    elif decode is not None:
        batch = decode(images)
    else:
        raise TypeError(
            f"images must be a normalised [N, 3, S, S] tensor, got {type(images).__name__}; pass decode= "
            "(lcl_fast.caption decodes PIL images, bytes and paths)"
        )
    n = batch.shape[0]
    prompts = [prompt] * n if prompt is None or isinstance(prompt, str) else list(prompt)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    prompt_ids = [tokenizer.encode(p) if p else [] for p in prompts]
    device = next(model.parameters()).device
    texts: list[str] = []
    eot = model.eot_id
    for start in range(0, n, batch_size):
        ids = generate(
            model,
            batch[start : start + batch_size].to(device),
            prompt_ids[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            use_cache=use_cache,
        )
        for row in ids.tolist():
            row = row[: row.index(eot)] if eot in row else [t for t in row if t != model.pad_id]
            texts.append(tokenizer.decode(row).strip())
    return texts
