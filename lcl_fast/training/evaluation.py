"""Evaluation during a run: held-out retrieval (synthetic data) and zero-shot classification, logged.

Called before training, at epoch ends (each kind at its own ``--val-frequency`` /
``--zeroshot-frequency``) and after training. Every rank takes part (FSDP2 needs them all; the
retrieval set is small, zero-shot images are shared out); random states are left untouched so
that a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import time

import torch

from . import distributed as D
from .config import TrainConfig
from .logging_utils import RunRecorder, log
from .loop import preserved_rng


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
            module.train()
        results["eval_seconds"] = time.perf_counter() - t0
        shown = {
            k: round(v, 4) for k, v in results.items() if k.endswith(("R@1", "R@5", "rank", "top1", "top5"))
        }
        log.info("eval (%s, step %d): %s", when, step, shown)
        self.recorder.eval_metrics(results)
        return results
