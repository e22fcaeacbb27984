"""Train the built-in digits models and write them into the package (``clusca_trt/data``):

    dit-digits.safetensors          the DiT ``dit-digits`` (EMA weights) on the "train" split
    digits-classifier.safetensors   the quality classifier on the "classifier" split, plus the
                                    FID-digits reference statistics of the "reference" split

    python benchmarks/train_digits.py                    # both; the DiT of this is stage 1 only
    # the shipped DiT is stage 1 (4000 steps, seed 0) then a second stage from it:
    python benchmarks/train_digits.py --what dit --out /tmp/stage1
    python benchmarks/train_digits.py --what dit --init /tmp/stage1/dit-digits.safetensors \
        --steps 2000 --lr 5e-4 --warmup 100 --seed 1   # about 32 + 13 minutes on one core
    python benchmarks/train_digits.py --what classifier  # the classifier only (about a minute)
    python benchmarks/train_digits.py --what dit --steps 200 --out /tmp/try   # a quick try

Seeded: the same seed, thread count and torch build give the same weights. The DiT predicts
eps under the forward process of ``clusca_trt.runtime.samplers`` (linear betas, 1000 steps),
so DDIM sampling with the engines is exact for it; its loss is the eps-MSE with capped
truncated-SNR weights (``DiTTrainOptions.snr_cap``), which makes it learn the class far sooner
than the plain eps-MSE does on this budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusca_trt.digits import quality  # noqa: E402
from clusca_trt.digits.data import load_split  # noqa: E402
from clusca_trt.hashing import file_sha256  # noqa: E402
from clusca_trt.models.dit import BUILTIN_WEIGHTS, NAMED_CONFIGS  # noqa: E402
from clusca_trt.digits.training import ClassifierOptions, DiTTrainOptions, train_classifier, train_dit  # noqa: E402

NAME = "dit-digits"


def save_dit(model, path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["all", "dit", "classifier"], default="all")
    p.add_argument("--out", type=Path, default=ROOT / "clusca_trt" / "data", help="output folder")
    p.add_argument("--steps", type=int, default=DiTTrainOptions.steps, help="DiT optimiser steps")
    p.add_argument("--batch", type=int, default=DiTTrainOptions.batch)
    p.add_argument("--lr", type=float, default=DiTTrainOptions.lr)
    p.add_argument("--snr-cap", type=float, default=DiTTrainOptions.snr_cap,
                   help="cap of the clip(1/SNR, 1, cap) loss weights (1: plain eps-MSE)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--init", type=Path, default=None,
                   help="start from these DiT weights (a second training stage) instead of DiT's initialisation")
    p.add_argument("--warmup", type=int, default=DiTTrainOptions.warmup)
    p.add_argument("--snapshots", type=Path, default=None, help="also write the EMA DiT here every 500 steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    torch.manual_seed(args.seed)

    if args.what in ("all", "classifier"):
        t0 = time.perf_counter()
        train, ref = load_split("classifier"), load_split("reference")
        opt = ClassifierOptions(seed=args.seed, threads=args.threads)
        model = train_classifier(train.images, train.labels, opt, progress=not args.no_progress)
        path = args.out / quality.CLASSIFIER_FILE.name
        ev = quality.save_evaluator(model, ref.as_unit(), path)
        acc = quality.class_accuracy(ref.as_unit(), ref.labels, ev)
        fid_train = quality.fid_digits(load_split("train").as_unit(), ev)
        print(f"classifier: {path} in {time.perf_counter() - t0:.0f} s; accuracy on the {len(ref)} held-out "
              f"reference digits {acc:.4f}; FID-digits of the real 'train' split vs reference {fid_train:.3f}")

    if args.what in ("all", "dit"):
        t0 = time.perf_counter()
        cfg = NAMED_CONFIGS[NAME]
        data = load_split("train")
        opt = DiTTrainOptions(steps=args.steps, batch=args.batch, lr=args.lr, snr_cap=args.snr_cap, seed=args.seed,
                              warmup=args.warmup, threads=args.threads)
        init = None
        if args.init is not None:
            from safetensors.torch import load_file

            init = load_file(str(args.init))
        snapshot = None
        if args.snapshots is not None:
            def snapshot(step, ema):
                save_dit(ema, args.snapshots / f"dit-digits-{step:05d}.safetensors", {"step": step})
        model, losses = train_dit(cfg, data.images, data.labels, opt, progress=not args.no_progress,
                                  snapshot=snapshot, init=init)
        seconds = time.perf_counter() - t0
        path = args.out / BUILTIN_WEIGHTS[NAME]
        meta = {"model": NAME, "config": cfg.to_dict(), "train": opt.__dict__, "split": "train",
                "final_loss": float(np.mean(losses[-200:])), "seconds": round(seconds),
                "init": None if args.init is None else {"file": args.init.name, "sha256": file_sha256(args.init)}}
        save_dit(model, path, meta)
        print(f"dit: {path} in {seconds / 60:.1f} min; final loss {meta['final_loss']:.4f}")


if __name__ == "__main__":
    main()
