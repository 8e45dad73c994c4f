"""The training loader: streams of batches, decoded on the device, resumable, equal steps per rank.

``build_train_loader(...)`` returns a :class:`TrainLoader`. Iterating it (``for batch in
loader``) runs ONE epoch of exactly ``len(loader)`` batches; the next ``iter()`` runs the next
epoch (``loader.epoch`` counts them). The sample streams underneath never end (each wraps around
its shards), so every rank yields the same number of steps whatever its shards hold, and no
sample is lost at an epoch boundary. Each batch is a dict:

- ``images``: ``float32 [n_images, 3, S, S]``, normalised, on ``device``, in row-major order of
  their ``<start_of_img>`` tokens;
- ``text_ids``: ``int64 [B, C]``; ``doc_ids`` / ``position_ids``: ``int64 [B, C]`` when packing
  (see :mod:`lcl_fast.data.packing`), else None; ``num_images``: ``int64 [B]``, images per row.

A batch has ``B`` rows, or fewer in the rare case DALI fails on an image whose header looked
fine (that image's row is dropped and counted, never the run).

Workers: with ``workers > 0`` each data-loader worker runs one stream (reading, tokenizing,
and with PIL decoding); with DALI the images are decoded in the main process, on the GPU when
``device`` is CUDA. ``loader.state_dict()`` holds every stream's position (a few integers per
stream, per rank: save each rank's, e.g. with ``all_gather_object``) and
``load_state_dict`` makes the loader yield exactly the batches the uninterrupted run would.

Shards may be remote (fsspec URLs, ``pipe:COMMAND``; see :mod:`lcl_fast.data.remote`): remote
tars are streamed, other remote shards are read like local ones, with the same positions.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import remote
from .batches import BatchStream
from .decode import BatchDecoder, normalize_uint8, resolve_backend
from .errors import DataError
from .packing import drop_rows, row_of_image, sample_token_counts
from .readers import TarShard
from .remote import is_remote
from .shards import expand_shards
from .sizes import count_samples, no_sample_reason, packing_ratio
from .skips import BadSample, SkipCounter, merge_counts
from .streaming import tar_samples
from .streams import StreamConfig

log = logging.getLogger("lcl_fast.data")

DATASET_TYPES = ("synthetic", "webdataset", "mmc4", "obelics")
_STATE_VERSION = 1


# ----------------------------------------------------------------------------- workers


class _WorkerStreams(IterableDataset):
    """Worker ``w`` runs local stream ``(first + w) % n``: the data loader's round robin over
    workers then visits the streams in the order the serial loop would."""

    def __init__(self, cfg: StreamConfig, positions: list[Optional[dict]], first: int):
        self.cfg, self.positions, self.first = cfg, positions, first

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        local = (self.first + worker) % self.cfg.streams_per_rank
        stream = BatchStream(
            self.cfg, self.cfg.rank * self.cfg.streams_per_rank + local, self.positions[local]
        )
        while True:
            batch = stream.next_batch()
            batch["stream"] = local
            yield batch


# ----------------------------------------------------------------------------- loader


class TrainLoader:
    """See the module docstring. Built by :func:`build_train_loader`."""

    def __init__(
        self,
        cfg: StreamConfig,
        steps_per_epoch: int,
        num_samples: int,
        *,
        workers: int = 0,
        device: Union[str, torch.device] = "cpu",
        decode_threads: Optional[int] = None,
        data_audit: Optional[str] = None,
    ):
        self.cfg = cfg
        self.data_audit = data_audit
        self.steps_per_epoch = steps_per_epoch
        self.num_samples = num_samples
        self.workers = workers
        self.device = torch.device(device)
        self.backend = cfg.backend
        self.epoch = 0
        self.step = 0
        self._positions: list[Optional[dict]] = [None] * cfg.streams_per_rank
        self._next_stream = 0
        self._late = SkipCounter()
        self._pad_tokens = 0
        self._tokens = 0
        self._decoder = BatchDecoder(cfg.image_size, self.device, decode_threads)
        self._running: Optional[tuple[Iterator[dict[str, Any]], Any]] = None

    def __len__(self) -> int:
        return self.steps_per_epoch

    # -- what the trainer logs
    @property
    def skip_counts(self) -> dict[str, int]:
        """Skipped items per kind, over every stream of this rank (and since any restored state)."""
        streams = [(p or {}).get("skips", {}) for p in self._positions]
        return merge_counts(*streams, self._late.snapshot())

    @property
    def padding_fraction(self) -> float:
        """Share of the yielded ``text_ids`` slots that are padding."""
        return self._pad_tokens / self._tokens if self._tokens else 0.0

    # -- resuming
    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.cfg
        shards = hashlib.sha1("\n".join(cfg.shards).encode()).hexdigest()
        return {
            "dataset_type": cfg.dataset_type,
            "shards": shards,
            "seed": cfg.seed,
            "rank": cfg.rank,
            "world_size": cfg.world_size,
            "streams_per_rank": cfg.streams_per_rank,
            "batch_size": cfg.batch_size,
            "context_length": cfg.context_length,
            "pack": cfg.pack,
            "num_img_token": cfg.num_img_token,
            "img_first_prob": cfg.img_first_prob,
            # only when set: states saved before these options existed still load
            **({"shuffle_buffer": cfg.shuffle_buffer} if cfg.shuffle_buffer else {}),
            **({"resampled": True} if cfg.resampled else {}),
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: epoch, step, and per stream ``(data_epoch, shard_pos, offset, skips)``."""
        epoch, step = (self.epoch + 1, 0) if self.step >= len(self) else (self.epoch, self.step)
        return {
            "version": _STATE_VERSION,
            "config": self._fingerprint(),
            "epoch": epoch,
            "step": step,
            "next_stream": self._next_stream,
            "streams": copy.deepcopy(self._positions),
            "late_skips": self._late.snapshot(),
            "pad_tokens": self._pad_tokens,
            "tokens": self._tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {_STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if diff:
            raise ValueError(f"loader state from another setup (saved, now): {diff}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self._next_stream = int(state["next_stream"])
        self._positions = copy.deepcopy(state["streams"])
        self.close()  # streams already running are elsewhere: restart from the loaded positions
        self._late = SkipCounter(state["late_skips"])
        self._pad_tokens, self._tokens = int(state["pad_tokens"]), int(state["tokens"])

    # -- iterating
    def _serial(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        streams = [
            BatchStream(cfg, cfg.rank * cfg.streams_per_rank + k, self._positions[k])
            for k in range(cfg.streams_per_rank)
        ]
        k = self._next_stream
        while True:
            batch = streams[k].next_batch()
            batch["stream"] = k
            yield batch
            k = (k + 1) % cfg.streams_per_rank

    def _source(self) -> tuple[Iterator[dict[str, Any]], Any]:
        if self.workers == 0:
            return self._serial(), None
        dataset = _WorkerStreams(self.cfg, copy.deepcopy(self._positions), self._next_stream)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=2,
        )
        it = iter(loader)
        return it, it

    def _audit(self, stream: int, keys: list[str]) -> None:
        """``--data-audit``: one line per consumed sample: rank, worker (stream), data epoch, shard, key."""
        path = self.data_audit
        if self.cfg.world_size > 1 or "{rank}" in path:
            path = path.format(rank=self.cfg.rank) if "{rank}" in path else f"{path}.rank{self.cfg.rank}"
        with open(path, "a") as f:
            f.writelines(f"{self.cfg.rank}\t{stream}\t{key}\n" for key in keys)

    def _finish(self, raw: dict[str, Any]) -> dict[str, Any]:
        k = raw["stream"]
        if self.data_audit:
            self._audit(k, raw["keys"])
        self._positions[k] = raw["position"]
        self._next_stream = (k + 1) % self.cfg.streams_per_rank
        if "images_u8" in raw:
            images = normalize_uint8(raw["images_u8"], self.device)
        else:
            images, failed = self._decoder(raw["image_items"])
            if failed:
                owner = row_of_image(raw["num_images"])
                dropped = sorted({owner[j] for j in failed})
                for j in failed:
                    self._late.add("image_decode", f"DALI could not decode an image of row {owner[j]}")
                survivors = [j for j in range(len(owner)) if j not in set(failed)]
                keep = [i for i, j in enumerate(survivors) if owner[j] not in set(dropped)]
                images = images[keep]
                raw = drop_rows(raw, dropped)
        self._pad_tokens += int(raw["pad_tokens"])
        self._tokens += raw["text_ids"].numel()
        dev = self.device
        move = lambda t: None if t is None else t.to(dev, non_blocking=True)  # noqa: E731
        batch = {
            "images": images,
            "text_ids": move(raw["text_ids"]),
            "doc_ids": move(raw["doc_ids"]),
            "position_ids": move(raw["position_ids"]),
            "num_images": move(raw["num_images"]),
        }
        token_ids = raw.get("target_token_ids")
        if token_ids is not None:  # counted and selected on the host: the step reads nothing back
            batch["target_token_ids"] = token_ids
            batch["targets"] = {k: move(v) for k, v in raw["targets"].items()}
            batch["text_stats"] = raw["text_stats"]
            batch["counts"] = sample_token_counts(raw["text_ids"], raw["doc_ids"], token_ids[3])
        return batch

    def close(self) -> None:
        """Stop the streams (and worker processes); the next iteration restarts them from the
        current positions."""
        self._running = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        # The streams never end, so they (and the workers) stay up from one epoch to the next,
        # as open_clip's persistent workers do: no restart, no shuffle buffer read again. The
        # batches they hold ahead come next, in the order a restart would give.
        if self._running is None:
            self._running = self._source()
        source = self._running[0]
        while self.step < len(self):
            batch = self._finish(next(source))
            self.step += 1
            yield batch
        log.info(
            "data: epoch %d done (%d steps); padding %.1f%%; skipped %s",
            self.epoch,
            len(self),
            100 * self.padding_fraction,
            self.skip_counts or "nothing",
        )
        self.epoch, self.step = self.epoch + 1, 0


# ----------------------------------------------------------------------------- builders


def _resolve_data(dataset_type: str, train_data: Optional[str], cache_dir: Optional[str]) -> tuple[str, str]:
    if dataset_type not in DATASET_TYPES:
        raise ValueError(f"dataset_type must be one of {DATASET_TYPES}, got {dataset_type!r}")
    if dataset_type != "synthetic":
        if not train_data:
            raise ValueError(
                f"dataset_type {dataset_type!r} needs train_data (a folder, brace pattern or '::' list)"
            )
        return dataset_type, train_data
    from .synthetic import ensure_corpus

    root = ensure_corpus(cache_dir)
    if train_data in (None, "", "pairs"):
        return "webdataset", str(root / "pairs")
    if train_data in ("interleaved", "mmc4"):
        return "mmc4", str(root / "mmc4")
    raise ValueError(f"synthetic train_data must be None, 'pairs' or 'interleaved', got {train_data!r}")


def build_train_loader(
    dataset_type: str,
    train_data: Optional[str],
    tokenizer: Any,
    *,
    batch_size: int,
    context_length: int,
    num_img_token: int,
    image_size: int,
    img_first_prob: float = 0.5,
    pack: bool = False,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    decoder: str = "auto",
    streams_per_rank: Optional[int] = None,
    num_samples: Optional[int] = None,
    steps_per_epoch: Optional[int] = None,
    image_root: Optional[str] = None,
    shuffle: bool = True,
    cache_dir: Optional[str] = None,
    decode_threads: Optional[int] = None,
    shuffle_buffer: int = 0,
    resampled: bool = False,
    shard_cache: Optional[str] = None,
    data_audit: Optional[str] = None,
    run_steps: Optional[int] = None,
) -> TrainLoader:
    """The training loader (see the module docstring).

    ``dataset_type``: ``"synthetic"`` (the built-in corpus; ``train_data`` None/"pairs" or
    "interleaved"), ``"webdataset"``, ``"mmc4"``, ``"obelics"``. ``train_data``: a folder, brace
    pattern or ``::``-joined list. ``tokenizer``: an object with ``encode`` and the special token
    ids (None: :func:`lcl_fast.data.get_tokenizer`). ``decoder``: ``"auto"`` (DALI on a CUDA
    ``device`` when installed, else PIL), ``"dali"``, ``"pil"``. ``streams_per_rank`` defaults to
    ``max(1, workers)`` (set it with ``workers=0`` to reproduce a worker run serially).
    ``num_samples`` / ``steps_per_epoch`` override the counted dataset size / epoch length.
    ``image_root``: the MMC4 image folder (or URL prefix). ``cache_dir``: where the synthetic
    corpus lives. ``shuffle_buffer``: samples per stream in the sample shuffle buffer (0: none;
    a stream's share of the data smaller than that is held whole). ``resampled``: shards drawn with replacement.
    ``shard_cache``: copy remote shards whole into this folder (else they are streamed); shard
    indexes live in its ``index`` folder (else in ``$LCL_FAST_CACHE/index``), never beside the shards.
    ``data_audit``: append the consumed keys to this file (``.rank{r}`` added when distributed).

    Remote shards (fsspec URLs, ``pipe:COMMAND``) are checked before anything else (bad
    credentials or an unreachable endpoint raise ``RuntimeError`` naming the URL); their sample
    count comes from a ``sizes.json`` beside them, else ``num_samples`` must be given, unless the
    run's length is fixed: ``steps_per_epoch``, or ``run_steps`` (the loader steps of the whole
    run, as ``--steps`` fixes them; the run is then one epoch).
    """
    for name, value in (
        ("batch_size", batch_size),
        ("context_length", context_length),
        ("num_img_token", num_img_token),
        ("image_size", image_size),
        ("world_size", world_size),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    streams = streams_per_rank if streams_per_rank is not None else max(1, workers)
    if workers and streams != workers:
        raise ValueError(f"with workers > 0, streams_per_rank ({streams}) must equal workers ({workers})")
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer(context_length=context_length)
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    kind, spec = _resolve_data(dataset_type, train_data, cache_dir)
    shards = expand_shards(spec, kind)
    remote_shards = [s for s in shards if is_remote(s)]
    if remote_shards:
        remote.check_access(remote_shards[0])
    n_streams = world_size * streams
    sizes, total = count_samples(kind, shards, exact=len(shards) < n_streams, cache_dir=shard_cache)
    length = steps_per_epoch or run_steps  # a run whose length is fixed needs no sample count
    uncounted = bool(remote_shards) and sizes is None and num_samples is None
    if num_samples is not None:
        total = num_samples
    elif uncounted and not length:
        raise ValueError(
            f"remote shards ({remote_shards[0]}, ...): give the number of samples "
            "(--train-num-samples / num_samples), put a sizes.json beside them, "
            "or fix the run's length (--steps / run_steps)"
        )
    if remote_shards and sizes is None and len(shards) < n_streams and not resampled:
        raise ValueError(
            f"{len(shards)} remote shards for {n_streams} streams: split them into at least "
            f"{n_streams} shards, add a sizes.json beside them, or use resampling"
        )
    if total == 0 and num_samples is None and not uncounted:
        raise DataError(no_sample_reason(kind, shards, shard_cache))
    if total < n_streams and not uncounted:
        raise ValueError(
            f"{total} samples in {len(shards)} shards cannot feed {n_streams} streams "
            f"(world_size {world_size} x streams_per_rank {streams})"
        )
    backend = resolve_backend(decoder, device)
    cfg = StreamConfig(
        dataset_type=kind,
        shards=shards,
        shard_sizes=sizes,
        tokenizer=tokenizer,
        batch_size=batch_size,
        context_length=context_length,
        num_img_token=num_img_token,
        image_size=image_size,
        img_first_prob=img_first_prob,
        pack=pack,
        world_size=world_size,
        rank=rank,
        streams_per_rank=streams,
        seed=seed,
        backend=backend,
        image_root=image_root,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer if shuffle else 0,
        resampled=resampled,
        cache_dir=shard_cache,
    )
    if steps_per_epoch is None and uncounted:
        steps_per_epoch = run_steps  # no count: the run is one epoch
    elif steps_per_epoch is None:
        rows = total * (packing_ratio(cfg) if pack else 1.0)
        steps_per_epoch = max(1, math.floor(rows / (batch_size * world_size)))
    log.info(
        "data: %s, %d shards, %s samples, %d steps per epoch, decoder %s%s",
        kind,
        len(shards),
        "uncounted" if uncounted else total,
        steps_per_epoch,
        backend,
        " (packed)" if pack else "",
    )
    return TrainLoader(
        cfg,
        steps_per_epoch,
        total,
        workers=workers,
        device=device,
        decode_threads=decode_threads,
        data_audit=data_audit,
    )


def build_eval_pairs(
    dataset_type: str = "synthetic",
    eval_data: Optional[str] = None,
    *,
    image_size: int,
    num_pairs: Optional[int] = None,
    cache_dir: Optional[str] = None,
    decoder: str = "auto",
    device: Union[str, torch.device] = "cpu",
) -> tuple[torch.Tensor, list[str]]:
    """Held-out ``(images [n, 3, S, S], captions)`` for retrieval, eval transform (resize + center crop).

    ``"synthetic"``: the built-in corpus's held-out pairs (distinct captions, never trained on);
    ``"webdataset"``: the pairs of ``eval_data`` shards, in stored order. Bad samples are skipped.
    """
    if dataset_type == "synthetic":
        from .synthetic import ensure_corpus

        spec = str(ensure_corpus(cache_dir) / "eval")
    elif dataset_type == "webdataset":
        if not eval_data:
            raise ValueError("build_eval_pairs('webdataset') needs eval_data")
        spec = eval_data
    else:
        raise ValueError(f"eval pairs come from 'synthetic' or 'webdataset' data, got {dataset_type!r}")
    backend = resolve_backend(decoder, device)
    skips = SkipCounter()
    items, captions = [], []
    from .decode import prepare_image

    for path in expand_shards(spec, "webdataset"):
        if is_remote(path):
            _remote_eval_pairs(path, num_pairs, image_size, backend, items, captions, skips)
            continue
        try:
            shard = TarShard(path)
        except BadSample as e:
            skips.bad(e)
            continue
        for i in range(len(shard)):
            if num_pairs is not None and len(captions) >= num_pairs:
                break
            try:
                sample = shard.read(i)
                items.append(prepare_image(sample["image"], image_size, False, 0, backend))
                captions.append(sample["caption"])
            except BadSample as e:
                skips.bad(e)
            except ValueError as e:
                skips.add("image_decode", f"{path}: sample {i}: {e}")
        shard.close()
    images, failed = BatchDecoder(image_size, device)(items)
    if failed:
        captions = [c for k, c in enumerate(captions) if k not in set(failed)]
    return images, captions


def _remote_eval_pairs(url, num_pairs, image_size, backend, items, captions, skips) -> None:
    """The pairs of one remote tar, streamed in stored order, appended to ``items`` / ``captions``."""
    from .decode import prepare_image
    from .readers import pair_from_members

    remote.check_access(url)
    ahead = remote.ReadAhead(url)
    try:
        for _, _, key, members, _ in tar_samples(ahead):
            if num_pairs is not None and len(captions) >= num_pairs:
                break
            try:
                sample = pair_from_members(url, key, members, members.__getitem__)
                items.append(prepare_image(sample["image"], image_size, False, 0, backend))
                captions.append(sample["caption"])
            except BadSample as e:
                skips.bad(e)
            except ValueError as e:
                skips.add("image_decode", f"{url}: {key}: {e}")
    except OSError as e:
        skips.add("shard_unreadable", f"{url}: {e}")
    finally:
        ahead.close()
