"""LCL's attentive pooler beside an exported tower: ``pooler.safetensors`` and a plain-torch way to apply it.

The exported towers give token features (``post_layernorm(last_hidden_state)[:, 1:]`` in transformers,
``forward_features(x)[:, 1:]`` in timm). LCL's contrastive image embedding pools those tokens with one
learned query. ``pooler.safetensors`` holds its weights under short names; its metadata holds
``num_heads``. :func:`pooled_embedding` is the whole computation; copy it if you do not want lcl-fast
installed downstream::

    import torch.nn.functional as F
    from safetensors import safe_open

    def pooled_embedding(tokens, p, num_heads):  # tokens [N, P, W] -> [N, E]
        ln = lambda x, n: F.layer_norm(x, x.shape[-1:], p[n + ".weight"], p[n + ".bias"], 1e-5)
        heads = lambda t: t.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # [N, L, E] -> [N, h, L, E/h]
        query = ln(p["query_token"], "norm1_q").expand(tokens.shape[0], -1, -1)
        q = heads(F.linear(query, p["q.weight"], p["q_bias"]))
        k = heads(F.linear(ln(tokens, "norm1_k"), p["k.weight"], p["k_bias"]))
        v = heads(F.linear(ln(tokens, "norm1_v"), p["v.weight"], p["v_bias"]))
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(1)
        return F.linear(pooled, p["proj.weight"])

    with safe_open("DIR/pooler.safetensors", "pt") as f:
        p = {k: f.get_tensor(k) for k in f.keys()}
        num_heads = int(f.metadata()["num_heads"])

L2-normalise the result to get ``model.encode_image(x)``; without normalising it equals
``model.encode_image(x, normalize=False)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Union

import torch
import torch.nn.functional as F

from ._common import EXTRA_HINT, ExportSource, save_safetensors

POOLER_FILE = "pooler.safetensors"
# lcl-fast / reference key (below ``pool_project.``) -> short name in pooler.safetensors
_NAMES = {
    "query_token": "query_token",
    **{f"pooler.norm1_{c}.{w}": f"norm1_{c}.{w}" for c in "qkv" for w in ("weight", "bias")},
    **{f"pooler.cross_attn.{c}.weight": f"{c}.weight" for c in "qkv"},
    **{f"pooler.cross_attn.{c}_bias": f"{c}_bias" for c in "qkv"},
    "pooler.cross_attn.proj.weight": "proj.weight",
}


def pooler_tensors(source: ExportSource) -> dict[str, torch.Tensor]:
    """The pooler's weights under their short names (``query_token [1, 1, W]``, ``q.weight [E, W]``, ...)."""
    have = source.pooler
    missing, extra = sorted(set(_NAMES) - set(have)), sorted(set(have) - set(_NAMES))
    if missing or extra:
        raise ValueError(f"unexpected attentive pooler tensors: missing {missing}, unknown {extra}")
    return {short: have[key] for key, short in _NAMES.items()}


def pooler_metadata(source: ExportSource) -> dict[str, str]:
    pool = source.pool
    return {
        "num_heads": str(pool.attn_num_heads),
        "input_dim": str(pool.input_dim),
        "output_dim": str(pool.output_dim),
        "layer_norm_eps": "1e-05",
        "input": "the vision tower's patch tokens after its final LayerNorm, class token dropped: [N, P, input_dim]",
    }


def write_pooler(source: ExportSource, folder: Path) -> None:
    save_safetensors(pooler_tensors(source), folder / POOLER_FILE, pooler_metadata(source))


def load_pooler(path: Union[str, os.PathLike]) -> tuple[dict[str, torch.Tensor], int]:
    """``(weights, num_heads)`` from ``pooler.safetensors`` (or a folder holding it)."""
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError(f"reading pooler.safetensors needs safetensors: {EXTRA_HINT}") from err
    path = Path(path)
    if path.is_dir():
        path = path / POOLER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {POOLER_FILE} at {path}")
    with safe_open(str(path), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
        num_heads = int((f.metadata() or {}).get("num_heads", 0))
    if num_heads <= 0:
        raise ValueError(f"{path}: metadata has no num_heads")
    return weights, num_heads


def pooled_embedding(tokens: torch.Tensor, p: Mapping[str, torch.Tensor], num_heads: int) -> torch.Tensor:
    """LCL's pooled image embedding from token features ``[N, P, W]`` → ``[N, E]`` (not normalised).

    ``p`` and ``num_heads`` come from :func:`load_pooler`. This is the function in the module
    docstring, line for line: plain torch, so it can be copied out.
    """
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], p[n + ".weight"], p[n + ".bias"], 1e-5)
    heads = lambda t: t.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # [N, L, E] -> [N, h, L, E/h]
    query = ln(p["query_token"], "norm1_q").expand(tokens.shape[0], -1, -1)
    q = heads(F.linear(query, p["q.weight"], p["q_bias"]))
    k = heads(F.linear(ln(tokens, "norm1_k"), p["k.weight"], p["k_bias"]))
    v = heads(F.linear(ln(tokens, "norm1_v"), p["v.weight"], p["v_bias"]))
    pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(1)
    return F.linear(pooled, p["proj.weight"])
