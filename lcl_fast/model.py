"""The LCL model: a drop-in for the reference's ``open_clip.lcl_model.LCL``.

Same constructor arguments, same ``forward(images, text)`` output dict, same state-dict keys.
lcl-fast adds keyword-only options: ``impl`` (attention implementation), ``fused_generation_loss``
(hand the loss the selected hidden states and the LM-head weight instead of full logits), and
``image_bidirectional`` (image latents attend to each other in both directions; off by default
because the reference is plain causal). With ``fused_generation_loss`` the output has ``hidden``,
``lm_head_weight`` and ``generation_live`` in place of ``logits`` (see :meth:`LCL.forward`).
``forward`` also takes ``doc_ids``/``position_ids`` for packed rows.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import config as C
from ._impl import resolve_impl
from .nn.towers import AttentivePoolingProjection, VisionTower, text_tower_class
from .nn.transformer import LayerNorm
from .targets import PAD_ID, loss_targets, text_stats


@torch.compiler.disable
def _targets_outside_graph(
    model: LCL, text: torch.Tensor, doc_ids: Optional[torch.Tensor], position_ids: Optional[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """:meth:`LCL.batch_targets` for a compiled forward that was not handed them: run eagerly, so that
    the graph breaks once, at this call, instead of at each of its value-dependent selections
    (``nonzero``). Their lengths vary from batch to batch: marked dynamic for the graph that resumes
    after the break, which then compiles once for every count."""
    targets = model.batch_targets(text, doc_ids, position_ids)
    for t in targets.values():
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return targets


class LCL(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        vision_cfg: Any,
        text_cfg: Any,
        pool_project_cfg: Any,
        special_token_ids: Optional[dict] = None,
        quick_gelu: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: Optional[float] = None,
        cast_dtype: Optional[torch.dtype] = None,
        *,
        impl: str = "auto",
        fused_generation_loss: bool = False,
        image_bidirectional: bool = False,
    ):
        super().__init__()
        vcfg, tcfg, pcfg = C.vision_cfg(vision_cfg), C.text_cfg(text_cfg), C.pool_project_cfg(pool_project_cfg)
        ids = C.special_token_ids(special_token_ids or {})
        if pcfg.input_dim != vcfg.width:
            raise ValueError(f"pool_project_cfg.input_dim {pcfg.input_dim} != vision width {vcfg.width}")
        if pcfg.output_dim != tcfg.width:
            raise ValueError(f"pool_project_cfg.output_dim {pcfg.output_dim} != text width {tcfg.width}")
        bad = {k: v for k, v in ids.items() if not 0 <= v < tcfg.vocab_size}
        if bad:
            raise ValueError(f"special token ids {bad} are outside the vocabulary of size {tcfg.vocab_size}")
        self.embed_dim = embed_dim
        self.vision_cfg, self.text_cfg, self.pool_project_cfg = vcfg, tcfg, pcfg
        self.special_token_ids = ids
        self.impl = impl
        self.fused_generation_loss = fused_generation_loss
        self.image_bidirectional = image_bidirectional
        fp32_norm = cast_dtype in (torch.float16, torch.bfloat16)
        self.cast_dtype = cast_dtype

        self.visual = VisionTower(vcfg, quick_gelu=quick_gelu, fp32_norm=fp32_norm, impl=impl)
        self.text = text_tower_class()(tcfg, embed_dim, quick_gelu=quick_gelu, fp32_norm=fp32_norm, impl=impl)
        self.pool_project = AttentivePoolingProjection(pcfg, fp32_norm=fp32_norm)
        self.lm_head = nn.Sequential(
            LayerNorm(tcfg.width, fp32=fp32_norm), nn.Linear(tcfg.width, tcfg.vocab_size, bias=False)
        )

        self.pad_id = PAD_ID
        self.sot_id = ids["<start_of_text>"]
        self.eot_id = ids["<end_of_text>"]
        self.img_id = ids["<img_placehold>"]
        self.soi_id = ids["<start_of_img>"]
        self.eoi_id = ids["<end_of_img>"]
        self.num_img_token = vcfg.grid**2

        self.logit_scale = nn.Parameter(torch.ones([]) * init_logit_scale)
        self.logit_bias = nn.Parameter(torch.ones([]) * init_logit_bias) if init_logit_bias is not None else None

    # ------------------------------------------------------------------ options
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """open_clip's ``CLIP.lock_image_tower`` (``--lock-image``): ``self.visual.lock(...)``; the pooler
        (``pool_project``) stays trainable."""
        self.visual.lock(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """open_clip's ``CLIP.lock_text_tower`` (``--lock-text``): ``self.text.lock(...)``; the LM head
        (``lm_head``) stays trainable."""
        self.text.lock(unlocked_layers=unlocked_layers, freeze_layer_norm=freeze_layer_norm)

    # ------------------------------------------------------------------ checks
    def _check_images(self, images: torch.Tensor) -> None:
        size = self.vision_cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(
                f"images must be [n_images, 3, {size}, {size}] for this config, got {list(images.shape)}"
            )

    def _check_text(
        self, text: torch.Tensor, n_images: int, *, check_soi: bool = True, stats: Optional[tuple] = None
    ) -> None:
        """Token ids in range, one placeholder run and (with ``check_soi``) one ``<start_of_img>`` per image.

        The counts are read back in one transfer: a single host sync per forward on a GPU; none when
        ``stats`` brings them (:func:`lcl_fast.targets.text_stats`, computed by the loader on the host).
        """
        if text.dim() != 2 or text.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text must be an integer tensor [batch, length], got {text.dtype} {list(text.shape)}")
        if text.shape[1] > self.text.context_length:
            raise ValueError(f"text length {text.shape[1]} exceeds context_length {self.text.context_length}")
        if not text.numel():
            return
        lo, hi, n_placeholders, n_soi = stats if stats is not None else text_stats(text, self.target_token_ids)
        if lo < 0 or hi >= self.text.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.text.vocab_size}), got min {lo} max {hi}")
        if n_placeholders != n_images * self.num_img_token:
            raise ValueError(
                f"text has {n_placeholders} <img_placehold> tokens but {n_images} images × "
                f"{self.num_img_token} image tokens = {n_images * self.num_img_token}"
            )
        if check_soi and n_soi != n_images:
            raise ValueError(f"text has {n_soi} <start_of_img> tokens but {n_images} images were given")

    # ------------------------------------------------------------------ encoders
    def _encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images → (pooled ``[N, E]``, image token embeddings ``[N, grid², E]``)."""
        self._check_images(images)
        return self.pool_project(self.visual(images))

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled, _ = self._encode_image(images)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _text_dtype(self) -> torch.dtype:
        return self.cast_dtype or self.text.token_embedding.weight.dtype

    def _run_text(
        self,
        embs: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        doc_ids: Optional[torch.Tensor] = None,
        image_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        pos = self.text.positional_embedding.to(embs.dtype)
        x = embs + (pos[: embs.shape[1]] if position_ids is None else pos[position_ids])
        return self.text.transformer(x, doc_ids=doc_ids, image_ids=image_ids)

    def encode_text(
        self, text: torch.Tensor, normalize: bool = True, context_length: Optional[int] = 77
    ) -> torch.Tensor:
        """Text features at ``<start_of_img>``, as the reference's ``encode_text``: every ``<end_of_text>``
        becomes ``<start_of_img>``, rows are cut to ``context_length`` (77 by default, as there; None: no
        cut), and a row left without ``<start_of_img>`` gets one in its last slot. One feature per
        ``<start_of_img>``, in row-major order.

        Unlike the reference, ``text`` is not modified in place.
        """
        if context_length is not None:
            if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
                raise ValueError(f"context_length must be a positive int or None, got {context_length!r}")
            text = text[:, :context_length]
        self._check_text(text, 0, check_soi=False)
        text = torch.where(text == self.eot_id, torch.full_like(text, self.soi_id), text)
        if text.numel():
            no_soi = ~(text == self.soi_id).any(dim=1)
            text = torch.cat([text[:, :-1], torch.where(no_soi, self.soi_id, text[:, -1]).unsqueeze(1)], dim=1)
        # The Triton kernel skips the tiles of trailing padding (evaluation pads texts to a few lengths).
        doc_ids = self.padding_doc_ids(text) if text.numel() and resolve_impl(self.impl, text) == "triton" else None
        x = self._run_text(self.text.token_embedding(text).to(self._text_dtype()), doc_ids=doc_ids)
        feats = self.text.project(x[text == self.soi_id])
        return F.normalize(feats, dim=-1) if normalize else feats

    # ------------------------------------------------------------------ the interleaved pass
    def interleaved_embeddings(self, image_embs: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image token embeddings spliced in at the placeholders (row-major)."""
        img_mask = text == self.img_id
        embs = self.text.token_embedding(text.masked_fill(img_mask, 0)).to(self._text_dtype())
        # the k-th placeholder (row-major) takes the k-th image token: a gather, so that the shapes
        # never depend on token values (masked_scatter's would not, but it does not compile as well)
        slot = (torch.cumsum(img_mask.flatten(), 0) - 1).clamp_min(0).view_as(text)
        tokens = image_embs.reshape(-1, image_embs.shape[-1]).to(embs.dtype)
        if tokens.shape[0] == 0:
            return embs
        return torch.where(img_mask.unsqueeze(-1), tokens[slot.clamp_max(tokens.shape[0] - 1)], embs)

    def image_ids(self, text: torch.Tensor) -> torch.Tensor:
        """Per-token image index (-1 for text) for bidirectional attention inside image blocks."""
        img_mask = text == self.img_id
        starts = img_mask & ~F.pad(img_mask[:, :-1], (1, 0), value=False)
        run = torch.cumsum(starts.flatten(), 0).view_as(text) - 1
        return torch.where(img_mask, run, torch.full_like(run, -1))

    def padding_doc_ids(self, text: torch.Tensor) -> torch.Tensor:
        """``doc_ids`` that mark the trailing pad run of each row with -1, so attention kernels skip it.

        Exact: nothing before the pad run attends to it (causal order), and no output at a pad slot is used
        (they predict no label and carry no ``<start_of_img>``).
        """
        nonpad = (text != self.pad_id).int()
        length = text.shape[1] - torch.argmax(nonpad.flip(1), dim=1)
        length = torch.where(nonpad.any(dim=1), length, torch.zeros_like(length))
        positions = torch.arange(text.shape[1], device=text.device)
        return torch.where(positions < length[:, None], 0, -1)

    def batch_targets(
        self, text: torch.Tensor, doc_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None
    ) -> dict[str, torch.Tensor]:
        """Which tokens the losses read, as index tensors: the value-dependent part of the forward.

        Returns ``pair_text_index [P]`` (flat ``B·L`` positions of the ``<start_of_img>`` tokens that
        have context), ``pair_image_index [P]`` (their images, in row-major ``<start_of_img>`` order)
        and ``gen_index [T]`` (flat ``B·(L-1)`` positions that predict a label: the reference's
        selection). Their lengths vary from batch to batch; computed here, outside a compiled
        forward (the training loop calls this on each batch), they enter it as inputs of dynamic
        size instead of boolean-mask indexing inside it. ``forward`` computes them itself when not given.
        The data loader computes the same on the host (:mod:`lcl_fast.targets`).
        """
        return loss_targets(text, doc_ids, position_ids, self.target_token_ids)

    @property
    def target_token_ids(self) -> tuple[int, int, int, int]:
        """``(<start_of_img>, <img_placehold>, <end_of_img>, pad)`` ids, as :func:`loss_targets` takes them."""
        return (self.soi_id, self.img_id, self.eoi_id, self.pad_id)

    def contrastive_features(
        self, pooled: torch.Tensor, hidden: torch.Tensor, pair_text_index: torch.Tensor, pair_image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (image, text) features ``[P, E]`` of the pairs picked by :meth:`batch_targets`."""
        text_feats = self.text.project(hidden.reshape(-1, hidden.shape[-1])[pair_text_index])
        image_feats = pooled[pair_image_index]
        # Normalised in float32 as the reference does, then back to the working dtype.
        text_feats = F.normalize(text_feats.float(), dim=-1).to(text_feats.dtype)
        image_feats = F.normalize(image_feats.float(), dim=-1).to(image_feats.dtype)
        return image_feats, text_feats

    def generation_targets(
        self, hidden: torch.Tensor, text: torch.Tensor, gen_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states that predict a label ``[T, W]``, their labels ``[T]``) at ``gen_index``."""
        width = hidden.shape[-1]
        return hidden[:, :-1].reshape(-1, width)[gen_index], text[:, 1:].reshape(-1)[gen_index]

    def check_inputs(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        *,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        targets: Optional[dict] = None,
        text_stats: Optional[tuple] = None,
    ) -> None:
        """The checks that read token values (one host sync): ``forward`` runs them in eager mode;
        a compiled forward skips them, and the training loop calls this once per batch instead.
        ``text_stats``: :func:`lcl_fast.targets.text_stats` of ``text`` with this model's
        :attr:`target_token_ids`, computed on the host (the loader does): then nothing is read back."""
        self._check_images(image)
        self._check_text(text, image.shape[0], stats=text_stats)
        for name, t in (("doc_ids", doc_ids), ("position_ids", position_ids)):
            if t is not None and t.shape != text.shape:
                raise ValueError(f"{name} shape {list(t.shape)} != text shape {list(text.shape)}")
        if targets is not None:
            n_text, n_image = targets["pair_text_index"].shape[0], targets["pair_image_index"].shape[0]
            if n_text != n_image:
                raise ValueError(
                    f"{n_image} images with context but {n_text} <start_of_img> tokens with context: "
                    "every image needs one <start_of_img>"
                )

    def forward(
        self,
        image: Optional[torch.Tensor] = None,
        text: Optional[torch.Tensor] = None,
        *,
        doc_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        pair_text_index: Optional[torch.Tensor] = None,
        pair_image_index: Optional[torch.Tensor] = None,
        gen_index: Optional[torch.Tensor] = None,
        check: bool = True,
    ) -> dict:
        """Images ``[N, 3, S, S]`` and interleaved token ids ``[B, L]`` → the loss's inputs.

        ``pair_text_index``/``pair_image_index``/``gen_index``: :meth:`batch_targets` of this batch
        (all three or none; computed here when absent). With them, and under ``torch.compile``
        (which skips the value checks: call :meth:`check_inputs` first), nothing in the forward
        depends on token values through a shape: one graph, no break (without them, as open_clip's trainer
        calls it, a compiled forward breaks once, where it selects them eagerly). ``check=False``: the caller ran
        :meth:`check_inputs` on this batch already (the training step does), so eager mode skips it too.
        """
        if image is None:
            raise ValueError("LCL.forward needs images (use encode_text for text-only features)")
        given = [t is not None for t in (pair_text_index, pair_image_index, gen_index)]
        if any(given) and not all(given):
            raise ValueError("pass pair_text_index, pair_image_index and gen_index together (LCL.batch_targets)")
        compiling = torch.compiler.is_compiling()
        if text is not None and not compiling:
            targets = None
            if not all(given):
                targets = self.batch_targets(text, doc_ids, position_ids)
                pair_text_index, pair_image_index = targets["pair_text_index"], targets["pair_image_index"]
                gen_index = targets["gen_index"]
            if check:
                self.check_inputs(image, text, doc_ids=doc_ids, position_ids=position_ids, targets={
                    "pair_text_index": pair_text_index, "pair_image_index": pair_image_index})
        pooled, image_embs = self._encode_image(image)
        if text is None:
            return {"image_features": F.normalize(pooled, dim=-1), "image_embs": image_embs}
        if not all(t is not None for t in (pair_text_index, pair_image_index, gen_index)):
            # compiled without targets (open_clip's trainer calls model(images, text)): one deliberate break
            targets = _targets_outside_graph(self, text, doc_ids, position_ids)
            pair_text_index, pair_image_index = targets["pair_text_index"], targets["pair_image_index"]
            gen_index = targets["gen_index"]

        embs = self.interleaved_embeddings(image_embs, text)
        image_ids = self.image_ids(text) if self.image_bidirectional else None
        attn_doc_ids = doc_ids
        if attn_doc_ids is None and resolve_impl(self.impl, text) == "triton":
            # The kernel skips tiles of padding outright; the torch paths gain nothing from it.
            attn_doc_ids = self.padding_doc_ids(text)
        hidden = self._run_text(embs, position_ids, attn_doc_ids, image_ids)

        image_features, text_features = self.contrastive_features(pooled, hidden, pair_text_index, pair_image_index)
        gen_hidden, labels = self.generation_targets(hidden, text, gen_index)
        out = {
            "image_features": image_features,
            "text_features": text_features,
            "labels": labels,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.fused_generation_loss:
            # No full logits: the loss gets the LM head's input and weight. Every value is a tensor whose
            # rows concatenate, because open_clip's cached-feature accumulation (--accum-freq) cats each key
            # across micro-batches: the weight as [1, V, W] (one copy per micro-batch), and
            # ``generation_live`` marking the rows computed with gradients (False for cached micro-batches),
            # so that only those rows reach the LM head's gradient, as they do through cached logits.
            out["hidden"] = self.lm_head[0](gen_hidden)
            out["lm_head_weight"] = self.lm_head[1].weight.unsqueeze(0)
            out["generation_live"] = torch.full(
                labels.shape, torch.is_grad_enabled(), dtype=torch.bool, device=labels.device
            )
        else:
            out["logits"] = self.lm_head(gen_hidden)
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        prompt_ids: Optional[Any] = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Token ids ``[B, T]`` generated after each image (and prompt); see :mod:`lcl_fast.generation`."""
        from .generation import generate

        return generate(
            self, images, prompt_ids, max_new_tokens=max_new_tokens, num_beams=num_beams, use_cache=use_cache
        )
