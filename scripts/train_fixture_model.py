"""Train the embedded default model `fixture:tiny_clip`: a tiny open_clip-architecture CLIP on digits.

Run from the repo root after building the dataset:
    python scripts/build_digits_dataset.py && python scripts/train_fixture_model.py

Loss per step (why not plain in-batch InfoNCE: a batch of 64 digits holds ~6 images of every class, so
"the other images are negatives" is mostly false and training stalls at chance):
  * cross-entropy of image features against the 10 class-prompt text features, one random template per
    step (teaches the class), plus
  * a multi-positive contrastive term between images and one random caption each, whose targets are
    uniform over the batch items with the same class and attribute words (teaches the attributes that
    captions describe, so retrieval has something to find).
Writes data/fixtures/tiny_clip/{config.json, model.safetensors (float16), train_log.json}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from clipprune.data.archive import fetch_and_extract
from clipprune.data.coco import CocoCaptions
from clipprune.data.imagefolder import load_classnames, load_templates
from clipprune.io import atomic_dir, save_safetensors
from digits_dataset import digit_records

MODEL_CFG = {
    "embed_dim": 64,
    # 65 tokens (8x8 patches of 4 px + CLS), 6 blocks x 6 heads of 32: heads for pruning to choose from.
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 192, "layers": 6, "head_width": 32, "mlp_ratio": 4.0},
    # open_clip's bundled BPE vocabulary (49,408 tokens) keeps the real tokenizer; a narrow text tower
    # keeps the token embedding, and so the committed file, small.
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}
IMAGE_MEAN = list(open_clip.OPENAI_DATASET_MEAN)
IMAGE_STD = list(open_clip.OPENAI_DATASET_STD)


def load_split(root: Path, split: str, transform) -> tuple[torch.Tensor, list[int], list[list[str]]]:
    ds = CocoCaptions(root / f"digits/images/{split}", root / f"digits/annotations/captions_{split}.json",
                      transform=transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return images, ds.image_ids, [ds.captions(i) for i in ds.image_ids]


@torch.no_grad()
def evaluate(model, tokenizer, images, labels, captions, classnames, templates) -> dict:
    model.eval()
    weights = []
    for name in classnames:
        feats = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in templates])), dim=-1)
        weights.append(F.normalize(feats.mean(0), dim=-1))
    weights = torch.stack(weights)
    img = F.normalize(model.encode_image(images), dim=-1)
    top1 = (img @ weights.T).argmax(1).eq(labels).float().mean().item()
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    txt = F.normalize(torch.cat([model.encode_text(tokenizer(flat[i:i + 512])) for i in range(0, len(flat), 512)]),
                      dim=-1)
    t2i_r1 = (txt @ img.T).argmax(1).eq(owner).float().mean().item()
    model.train()
    return {"zeroshot_top1": top1, "text_to_image_r1": t2i_r1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", default="data/fixtures/digits.zip")
    ap.add_argument("--out", default="data/fixtures/tiny_clip")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--caption-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    transform = open_clip.image_transform(MODEL_CFG["vision_cfg"]["image_size"], is_train=False,
                                          mean=IMAGE_MEAN, std=IMAGE_STD)
    with tempfile.TemporaryDirectory() as tmp:
        root = fetch_and_extract(args.archive, Path(tmp) / "raw", progress=False)
        train_x, train_ids, train_caps = load_split(root, "train", transform)
        val_x, val_ids, val_caps = load_split(root, "val", transform)
        classnames = load_classnames(root / "digits/classification/classnames.json")
        templates = load_templates(root / "digits/classification/templates.json")

    records = {r.image_id: r for r in digit_records(args.seed)}  # labels and attribute words per image
    train_y = torch.tensor([records[i].label for i in train_ids])
    val_y = torch.tensor([records[i].label for i in val_ids])
    signature = [(records[i].label, tuple(sorted(records[i].attributes.items()))) for i in train_ids]
    sig_codes = {s: k for k, s in enumerate(sorted(set(signature)))}
    train_sig = torch.tensor([sig_codes[s] for s in signature])

    model = open_clip.model.CLIP(**MODEL_CFG)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    prompts = torch.stack([tokenizer([t.format(c=c) for c in classnames]) for t in templates])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    n = len(train_x)
    total_steps = args.epochs * math.ceil(n / args.batch_size)
    step, log, start = 0, [], time.time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(n, generator=gen)
        for lo in range(0, n, args.batch_size):
            idx = order[lo:lo + args.batch_size]
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            template = int(torch.randint(len(templates), (1,), generator=gen))
            pick = torch.randint(5, (len(idx),), generator=gen)
            caps = tokenizer([train_caps[i][int(p) % len(train_caps[i])] for i, p in zip(idx.tolist(), pick)])
            img = F.normalize(model.encode_image(train_x[idx]), dim=-1)
            cls_txt = F.normalize(model.encode_text(prompts[template]), dim=-1)
            cap_txt = F.normalize(model.encode_text(caps), dim=-1)
            scale = model.logit_scale.exp()
            class_loss = F.cross_entropy(scale * img @ cls_txt.T, train_y[idx])
            same = (train_sig[idx][:, None] == train_sig[idx][None, :]).float()
            target = same / same.sum(1, keepdim=True)
            logits = scale * img @ cap_txt.T
            caption_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            loss = class_loss + args.caption_weight * caption_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
        metrics = evaluate(model, tokenizer, val_x, val_y, val_caps, classnames, templates)
        entry = {"epoch": epoch + 1, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1),
                 **{k: round(v, 4) for k, v in metrics.items()}}
        log.append(entry)
        print(json.dumps(entry), flush=True)

    # Round to float16 (half the file) and report the accuracy of exactly what is committed.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    final = evaluate(model, tokenizer, val_x, val_y, val_caps, classnames, templates)
    print("float16 weights:", json.dumps(final))
    config = {"family": "open_clip", "model_cfg": MODEL_CFG, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD}
    with atomic_dir(args.out) as out:
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(out / "model.safetensors", state, {"trained_by": "scripts/train_fixture_model.py"})
        (out / "train_log.json").write_text(json.dumps({"args": vars(args), "epochs": log, "final": final},
                                                       indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
