"""Export for open_clip users: the whole LCL model in open_clip's own checkpoint and hub layout.

lcl-fast's state dict already uses the reference's key names, so the open_clip export is the model
itself, nothing renamed (``visual.proj`` is absent because the reference sets it to ``None``):

- ``open_clip_pytorch_model.bin``: a bare state dict (``torch.save``) that the reference's
  ``open_clip.create_model("LCL_ViT-B-32_laion", pretrained="DIR/open_clip_pytorch_model.bin")`` loads,
  and so does ``lcl_fast.create_model(name, pretrained=...)``;
- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}``, the layout open_clip's
  ``create_model("hf-hub:USER/REPO")`` reads after ``--push-to-hub``; ``model_cfg`` is also what a
  reference checkout needs for a configuration it does not ship (save it as ``<name>.json`` and call
  ``open_clip.add_model_config``).

The vision tower with the attentive pooler is inside: ``model.encode_image`` in the reference gives
the pooled embedding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ._common import ExportSource, image_mean_std, write_json

WEIGHTS_FILE = "open_clip_pytorch_model.bin"
CONFIG_FILE = "open_clip_config.json"


def open_clip_config(source: ExportSource) -> dict:
    mean, std = image_mean_std()
    return {
        "model_cfg": source.model_config,
        "preprocess_cfg": {
            "size": source.vision.image_size,
            "mode": "RGB",
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
        "model_name": source.name,
    }


def write_open_clip(source: ExportSource, folder: Path) -> None:
    torch.save(dict(source.state_dict), folder / WEIGHTS_FILE)
    write_json(open_clip_config(source), folder / CONFIG_FILE)
