"""Evaluation during a run: held-out retrieval (synthetic data) and zero-shot classification, logged.

Called before training, at epoch ends (each kind at its own ``--val-frequency`` /
``--zeroshot-frequency``) and after training. Every rank takes part (FSDP2 needs them all; the
retrieval set is small, zero-shot images are shared out); random states are left untouched so
that a resumed run sees the same data as an uninterrupted one.

On the built-in corpus, before and after training also measure what the paper measures, on a
small scale (a few seconds): an attentive probe's top-1 on the corpus's colour × shape classes
and the CIDEr of greedy captions of the held-out pairs (rank 0 only; not under FSDP, whose
sharded text blocks the decoder cannot read), for runs of at least ``TRANSFER_MIN_STEPS`` steps:
a before/after comparison of a handful of steps says nothing and would only slow them down.
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from . import distributed as D
from .config import TrainConfig
from .logging_utils import RunRecorder, log
from .loop import preserved_rng

TRANSFER_MIN_STEPS = 100


def _due(epoch: int, frequency: int) -> bool:
    return bool(frequency) and epoch % frequency == 0


class RunEvaluator:
    """Held-out retrieval (synthetic data) and zero-shot classification (``--imagenet-val``), logged."""

    def __init__(
        self,
        cfg: TrainConfig,
        env: D.DistEnv,
        model,
        tokenizer,
        autocast,
        recorder: RunRecorder,
        steps_per_epoch: int,
        total_steps: Optional[int] = None,
    ):
        from ..data import build_eval_pairs

        self.cfg, self.env, self.model, self.tokenizer = cfg, env, model, tokenizer
        self.autocast, self.recorder, self.steps_per_epoch = autocast, recorder, steps_per_epoch
        self.pairs = None
        if cfg.dataset_type == "synthetic" and cfg.val_pairs:
            inner = D.unwrap(model)
            self.pairs = build_eval_pairs(
                "synthetic",
                image_size=inner.vision_cfg.image_size,
                num_pairs=cfg.val_pairs,
                device=env.device,
            )
        long_enough = total_steps is None or total_steps >= TRANSFER_MIN_STEPS
        self.transfer = self.pairs is not None and env.is_main and not cfg.fsdp and long_enough

    def __call__(self, step: int, when: str) -> dict:
        from .. import eval as E

        cfg = self.cfg
        epoch = step // self.steps_per_epoch
        retrieval = self.pairs is not None and (when != "epoch" or _due(epoch, cfg.val_frequency))
        zeroshot = cfg.imagenet_val is not None and (
            when == "after" or (when == "epoch" and _due(epoch, cfg.zeroshot_frequency))
        )
        if not retrieval and not zeroshot:
            return {}
        results: dict = {"step": step, "epoch": epoch, "when": when}
        t0 = time.perf_counter()
        with preserved_rng(), torch.no_grad(), D.full_params(self.model) as module:
            module.eval()
            if retrieval:
                images, captions = self.pairs
                results.update(
                    E.evaluate_retrieval(
                        module,
                        self.tokenizer,
                        images,
                        captions,
                        context_length=module.text.context_length,
                        autocast=self.autocast,
                    )
                )
            if zeroshot:
                results.update(
                    E.evaluate_zero_shot(module, self.tokenizer, cfg.imagenet_val, autocast=self.autocast)
                )
            if self.transfer and when in ("before", "after"):
                results.update(self._transfer(module))
            module.train()
        results["eval_seconds"] = time.perf_counter() - t0
        shown = {
            k: round(v, 4)
            for k, v in results.items()
            if k.endswith(("R@1", "R@5", "rank", "top1", "top5", "cider"))
        }
        log.info("eval (%s, step %d): %s", when, step, shown)
        self.recorder.eval_metrics(results)
        return results

    def _transfer(self, module) -> dict:
        """Probe top-1 (colour × shape) and held-out CIDEr with three example captions."""
        from ..eval.caption import evaluate_captions
        from ..eval.probe import builtin_probe

        probe = builtin_probe(module, autocast=self.autocast)
        out = {"probe_top1": probe["top1"], "probe_chance": probe["chance"], "probe_classes": probe["num_classes"]}
        images, captions = self.pairs
        try:
            scored = evaluate_captions(
                module, self.tokenizer, images, [[c] for c in captions], max_new_tokens=16, autocast=self.autocast
            )
        except ImportError as err:  # pycocoevalcap is an optional extra
            log.info("held-out CIDEr skipped: %s", err)
            return out
        out["cider"], out["bleu4"] = scored["cider"], scored["bleu4"]
        out["caption_examples"] = [[c, r] for c, r in zip(scored["captions"][:3], captions[:3])]
        return out
