"""``python -m lcl_fast.eval {probe,retrieval,caption,zeroshot} [options]``.

Each subcommand prints a short table and writes its results as JSON to ``--output FILE.json``, or,
without it, when ``--pretrained`` is a checkpoint of a training run (``<run>/checkpoints/step_N.pt``), to
``<run>/eval/<command>_step_N.json``; otherwise it writes nothing (never into the current folder). It takes ``--model``
(a name or a JSON config) and ``--pretrained`` (a checkpoint; without it, the fixed-seed
initialisation), and runs on CUDA with bf16 autocast when available.

- ``probe --train-folder DIR --val-folder DIR [--probe attentive|linear]``: frozen-encoder probe;
- ``retrieval [--karpathy-json FILE --images DIR --split test | --wds-shards SPEC]``: recall@1/5/10
  (the built-in corpus's held-out pairs without either);
- ``caption [--coco-annotations FILE --images DIR]``: BLEU-4 and CIDEr, captions written in COCO
  results format (the built-in held-out pairs without annotations);
- ``zeroshot --imagenet-val DIR``: zero-shot top-1/top-5.

Without a subcommand: the held-out retrieval of the built-in corpus and, with ``--imagenet-val``,
zero-shot classification, printed as JSON (the original command line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import ArgumentParser, add_debug_flag, report
from .common import EvalInputError, add_model_args, load_model, print_table, run_folder_output, write_output

COMMANDS = ("probe", "retrieval", "caption", "zeroshot")


# ---------------------------------------------------------------------- subcommands
def _model_id(args) -> dict:
    from ..factory import get_model_config

    ident: dict = {"config": get_model_config(args.model)}
    if args.pretrained:
        st = Path(args.pretrained).stat()
        ident["pretrained"] = [str(Path(args.pretrained).resolve()), st.st_size, st.st_mtime_ns]
    else:
        ident["pretrained"] = "init-seed-0"
    return ident


def run_probe(args) -> dict:
    from ..data.shards import cache_root
    from .probe import evaluate_probe_folders

    model, _, _, autocast = load_model(args)
    cache_dir = None if args.no_cache else (args.cache_dir or cache_root() / "probe_features")
    out = evaluate_probe_folders(
        model,
        args.train_folder,
        args.val_folder,
        probe=args.probe,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        workers=args.workers,
        autocast=autocast,
        cache_dir=cache_dir,
        model_id=_model_id(args),
        progress=not args.no_progress,
    )
    print_table(f"{args.probe} probe ({out['num_train']} train / {out['num_val']} val images)", [
        ("top-1", out["top1"]), ("top-5", out["top5"]), ("chance", out["chance"]),
        ("classes", out["num_classes"]), ("epochs", out["epochs"]), ("skipped images", out["skipped"]),
    ])  # fmt: skip
    return out


def run_retrieval(args) -> dict:
    from .retrieval import evaluate_retrieval_files, evaluate_retrieval_shards, multi_caption_metrics

    model, tokenizer, device, autocast = load_model(args)
    if args.karpathy_json:
        if not args.images:
            raise EvalInputError("--karpathy-json needs --images DIR")
        from .retrieval import load_karpathy

        files, captions = load_karpathy(args.karpathy_json, args.images, args.split)
        out = evaluate_retrieval_files(
            model,
            tokenizer,
            files,
            captions,
            batch_size=args.batch_size,
            workers=args.workers,
            autocast=autocast,
            progress=not args.no_progress,
        )
        source = f"{args.karpathy_json} ({args.split})"
    elif args.wds_shards:
        out = evaluate_retrieval_shards(
            model, tokenizer, args.wds_shards, batch_size=args.batch_size, autocast=autocast
        )
        source = args.wds_shards
    else:
        import torch

        from ..data import build_eval_pairs
        from .common import encode_images, encode_texts

        images, captions = build_eval_pairs("synthetic", image_size=model.vision_cfg.image_size, device=device)
        img = encode_images(model, images, batch_size=args.batch_size, autocast=autocast)
        txt = encode_texts(model, tokenizer, captions, batch_size=args.batch_size, autocast=autocast)
        out = multi_caption_metrics(img, txt, torch.arange(len(captions)))
        source = "built-in held-out pairs"
    rows = [(f"{way} R@{k}", out[f"{way}_R@{k}"]) for way in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    print_table(f"retrieval on {source}: {out['num_images']} images, {out['num_captions']} captions",
                rows + [("chance (R@1)", out["chance"])])  # fmt: skip
    return out


def run_caption(args) -> dict:
    model, tokenizer, device, autocast = load_model(args)
    if args.coco_annotations:
        if not args.images:
            raise EvalInputError("--coco-annotations needs --images DIR")
        from .caption import evaluate_coco_captions

        out, results = evaluate_coco_captions(
            model,
            tokenizer,
            args.coco_annotations,
            args.images,
            max_new_tokens=args.max_new_tokens,
            num_beams=args.beam_size,
            batch_size=args.batch_size,
            workers=args.workers,
            autocast=autocast,
            max_images=args.max_images,
            progress=not args.no_progress,
        )
    else:
        from ..data import build_eval_pairs
        from .caption import evaluate_captions

        images, refs = build_eval_pairs(
            "synthetic", image_size=model.vision_cfg.image_size, device=device, num_pairs=args.max_images
        )
        out = evaluate_captions(
            model,
            tokenizer,
            images,
            [[r] for r in refs],
            max_new_tokens=args.max_new_tokens,
            num_beams=args.beam_size,
            batch_size=args.batch_size,
            autocast=autocast,
        )
        results = [{"image_id": i, "caption": c} for i, c in enumerate(out.pop("captions"))]
    results_file = args.results_file or (
        str(Path(args.output).with_suffix("")) + "_captions.json" if args.output else None
    )
    if results_file is not None:
        Path(results_file).parent.mkdir(parents=True, exist_ok=True)
        Path(results_file).write_text(json.dumps(results, indent=1) + "\n")
    out["results_file"] = results_file
    out["beam_size"] = args.beam_size
    print_table(f"captioning ({'beam ' + str(args.beam_size) if args.beam_size > 1 else 'greedy'})", [
        ("BLEU-4", out["bleu4"]), ("CIDEr", out["cider"]), ("images", out["num_images"]),
        ("skipped images", out.get("skipped", 0)),
    ])  # fmt: skip
    for r in results[:3]:
        print(f"  {r['image_id']}: {r['caption']}")
    if results_file is not None:
        print(f"captions written to {results_file}")
    else:
        print("captions not written (give --output or --results-file to keep them)")
    return out


def run_zeroshot(args) -> dict:
    from .zeroshot import evaluate_zero_shot

    model, tokenizer, _, autocast = load_model(args)
    out = evaluate_zero_shot(
        model, tokenizer, args.imagenet_val, templates=args.templates, batch_size=args.batch_size,
        autocast=autocast, decoder="pil", progress=not args.no_progress,
    )  # fmt: skip
    k = min(5, out["zeroshot_classes"])
    print_table(f"zero-shot classification on {args.imagenet_val}", [
        ("top-1", out["zeroshot_top1"]), (f"top-{k}", out[f"zeroshot_top{k}"]), ("chance", out["zeroshot_chance"]),
        ("classes", out["zeroshot_classes"]), ("images", out["zeroshot_images"]),
        ("skipped images", out["zeroshot_skipped"]),
    ])  # fmt: skip
    return out


# ---------------------------------------------------------------------- parsers
def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m lcl_fast.eval", description="Evaluate an LCL model.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{probe,retrieval,caption,zeroshot}")

    probe = sub.add_parser("probe", help="classification from the frozen encoder")
    probe.add_argument("--train-folder", required=True, help="ImageNet-style folder (one sub-folder per class)")
    probe.add_argument("--val-folder", required=True, help="the same classes, held out")
    probe.add_argument("--probe", default="attentive", choices=("attentive", "linear"))
    probe.add_argument("--epochs", type=int, default=10)
    probe.add_argument("--lr", type=float, default=1e-3)
    probe.add_argument("--cache-dir", default=None, help="feature cache (default $LCL_FAST_CACHE/probe_features)")
    probe.add_argument("--no-cache", action="store_true", help="recompute the frozen features")

    ret = sub.add_parser("retrieval", help="image<->text retrieval recall@1/5/10")
    ret.add_argument("--karpathy-json", default=None, help="dataset_coco.json / dataset_flickr30k.json")
    ret.add_argument("--images", default=None, help="the images folder of --karpathy-json")
    ret.add_argument("--split", default="test")
    ret.add_argument("--wds-shards", default=None, help="webdataset eval shards (folder, file or brace pattern)")

    cap = sub.add_parser("caption", help="captions from LCL's language model: BLEU-4, CIDEr")
    cap.add_argument("--coco-annotations", default=None, help="COCO captions JSON (images, annotations)")
    cap.add_argument("--images", default=None, help="the images folder of --coco-annotations")
    cap.add_argument("--beam-size", type=int, default=1, help="1: greedy")
    cap.add_argument("--max-new-tokens", type=int, default=20)
    cap.add_argument("--max-images", type=int, default=None)
    cap.add_argument("--results-file", default=None,
                     help="COCO results JSON (default: beside --output as <output>_captions.json)")

    zs = sub.add_parser("zeroshot", help="zero-shot classification on an ImageNet-style folder")
    zs.add_argument("--imagenet-val", required=True, help="ImageNet-style folder")
    zs.add_argument("--templates", default="openai", help="'openai' (80), 'simple' (7) or a file, one per line")

    for sp in (probe, ret, cap, zs):
        add_model_args(sp)
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _legacy_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m lcl_fast.eval",
        description="Held-out retrieval and zero-shot classification (subcommands: " + ", ".join(COMMANDS) + ").",
    )
    p.add_argument("--model", default="LCL_tiny", help="registered model name or JSON config path")
    p.add_argument("--pretrained", default=None, help="checkpoint (a training checkpoint or a state dict)")
    p.add_argument("--imagenet-val", default=None, help="ImageNet-style folder for zero-shot classification")
    p.add_argument("--templates", default="openai", help="'openai' (80), 'simple' (7) or a file, one per line")
    p.add_argument("--retrieval", default="synthetic", choices=("synthetic", "none"),
                   help="held-out pairs of the built-in corpus for retrieval")  # fmt: skip
    p.add_argument("--val-pairs", type=int, default=None, help="number of held-out pairs (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "amp_bf16", "amp"))
    add_debug_flag(p)
    return p


def _legacy(argv: Sequence[str]) -> dict:
    from ..data import build_eval_pairs
    from .retrieval import evaluate_retrieval
    from .zeroshot import evaluate_zero_shot

    args = _legacy_parser().parse_args(argv)
    model, tokenizer, device, autocast = load_model(args)
    results: dict = {"model": args.model, "pretrained": args.pretrained}
    if args.retrieval == "synthetic":
        images, captions = build_eval_pairs(
            "synthetic", image_size=model.vision_cfg.image_size, num_pairs=args.val_pairs, device=device
        )
        results.update(
            evaluate_retrieval(model, tokenizer, images, captions, batch_size=args.batch_size, autocast=autocast)
        )
    if args.imagenet_val:
        results.update(evaluate_zero_shot(model, tokenizer, args.imagenet_val, templates=args.templates,
                                          batch_size=args.batch_size, autocast=autocast))  # fmt: skip
    print(json.dumps(results, indent=2))
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run one subcommand (or the original command line); returns the results dict.

    Bad input exits with status 2 and one line ``lcl_fast.eval: error: ...`` naming the file
    (``--debug``: the traceback instead).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
            return _legacy(argv)
        args = _parser().parse_args(argv)
        if args.output is None:
            args.output = run_folder_output(args.pretrained, args.command)
        runner = {"probe": run_probe, "retrieval": run_retrieval, "caption": run_caption, "zeroshot": run_zeroshot}
        out = runner[args.command](args)
        out = {"command": args.command, "model": args.model, "pretrained": args.pretrained, **out}
        write_output(args.output, out)
    except Exception as err:  # a user error becomes one line; a bug keeps its traceback
        raise SystemExit(report(err, "lcl_fast.eval", argv)) from None
    if args.output:
        print(f"results written to {args.output}")
    return out


if __name__ == "__main__":
    main()
