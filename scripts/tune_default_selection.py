"""Utility-based selection on the plain 2400-image pool of tune_default_diagnose.py (validation accuracy).

TODV (loss-only, 150 steps) on D_r + 300 plain images (pretrained class prompts), then 80/class kept
from 160 (m=2) or 240 (m=3) candidates: first (no selection), top utility, band (drop the lowest
fraction), bottom, drop-top, middle; each pool evaluated with tune_default.train_and_evaluate.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)
import tune_default as T

from utilgen.adaptation import select_indices_per_class
from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.generator import load_pretrained
from utilgen.valuation import BiLevelConfig, fit_valuation

data = load_embedded(16)
splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=None, seed=0)
val = T.validation_subset(300, 16)
gen = load_pretrained()
imgs, labels = torch.load("/tmp/tune/plain2400.pt")
first_labels = torch.arange(10).repeat_interleave(30)
pool0 = LabelledImages(
    gen.sample(
        gen.class_prompt_embeds(first_labels),
        gen.initial_noise([10000 + i for i in range(300)]),
        guidance_scale=2.0,
        steps=10,
    ),
    first_labels,
    splits.train.class_names,
)
v = fit_valuation(
    splits.train, pool0, splits.meta, BiLevelConfig(steps=150, batch_size=64, meta_batch_size=50, progress=False)
)
u = v.score(imgs, labels)
torch.save(u, "/tmp/tune/plain2400_util.pt")
res = {}


def ev(name, idx):
    pool = LabelledImages(imgs[idx], labels[idx], splits.train.class_names)
    accs = [T.train_and_evaluate(pool, val, s, 400) for s in range(3)]
    res[name] = T.summarise(accs) | {"mean_utility": round(float(u[idx].mean()), 4)}
    print(name, res[name], flush=True)


# m=2 subset: first 160 of each class
m2 = torch.cat([torch.nonzero(labels == k).flatten()[:160] for k in range(10)])
for name, (cand, mode, drop) in {
    "m3-first": (None, "first", 0),
    "m3-top": (None, "top", 0),
    "m3-band0.2": (None, "band", 0.2),
    "m3-band0.4": (None, "band", 0.4),
    "m2-top": (m2, "top", 0),
    "m2-band0.25": (m2, "band", 0.25),
    "m3-band0.1": (None, "band", 0.1),
}.items():
    c = torch.arange(len(labels)) if cand is None else m2
    idx = c[select_indices_per_class(labels[c], u[c], 80, mode=mode, drop_fraction=drop)]
    ev(name, idx)


def quantile_band(m, lo, hi):
    out = []
    for k in range(10):
        mem = torch.nonzero(labels == k).flatten()[: 80 * m]
        asc = mem[torch.argsort(u[mem], stable=True)]
        n = len(asc)
        surv = torch.sort(asc[int(lo * n) : int(hi * n)]).values
        out.append(surv[:80])
    return torch.cat(out)


ev("m3-bottom80", quantile_band(3, 0, 1 / 3))
ev("m3-drop-top-40%", quantile_band(3, 0, 0.6))
ev("m3-middle-0.05-0.6", quantile_band(3, 0.05, 0.6))
json.dump(res, open("/tmp/tune/sel.json", "w"), indent=1)
