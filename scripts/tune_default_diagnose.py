"""Diagnostics for scripts/tune_default.py (validation side only; never the test split).

A reference classifier (cnn-small, 1500 steps) trained on 20k images of the Debian Fashion-MNIST
train file that are NOT in the validation subset; 2400 plain images (240/class, 10 DDIM steps,
guidance 2); TODV (loss-only and loss+margin+entropy) on D_r + 300 plain images; then: reference
agreement of the plain pool, the learned w(loss) curve, AUROC of the utility for reference-correct
samples, reference agreement per utility decile. Writes /tmp/tune/plain2400.pt (+ utilities via
tune_default_selection.py).
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(2)
import torch.nn.functional as F

from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.data.fashion_mnist import load_debian_images
from utilgen.generator import load_pretrained
from utilgen.models import build_classifier
from utilgen.valuation import BiLevelConfig, fit_valuation

data = load_embedded(16)
splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=None, seed=0)
full = load_debian_images("train", 16)
# oracle: train on 20k images from train file NOT in the validation subset (first 300/class)
valmask = torch.zeros(len(full), dtype=torch.bool)
for k in range(10):
    valmask[torch.nonzero(full.labels == k).flatten()[:300]] = True
rest = torch.nonzero(~valmask).flatten()[:20000]
otrain = full.subset(rest)
val = full.subset(torch.nonzero(valmask).flatten())
t = time.time()
torch.manual_seed(0)
oracle = build_classifier("cnn-small", num_classes=10, in_channels=1, image_size=16)
opt = torch.optim.SGD(oracle.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
g = torch.Generator().manual_seed(0)
for s in range(1500):
    b = torch.randint(0, len(otrain), (128,), generator=g)
    loss = F.cross_entropy(oracle(otrain.images[b]), otrain.labels[b])
    opt.zero_grad()
    loss.backward()
    opt.step()
    sch.step()
oracle.eval()
with torch.no_grad():
    print(
        "oracle val acc",
        float((oracle(val.images).argmax(1) == val.labels).float().mean()),
        time.time() - t,
        flush=True,
    )
gen = load_pretrained()
labels = torch.arange(10).repeat_interleave(240)
t = time.time()
imgs = gen.sample(
    gen.class_prompt_embeds(labels),
    gen.initial_noise([70000 + i for i in range(len(labels))]),
    guidance_scale=2.0,
    steps=10,
)
print("sample 2400", time.time() - t, flush=True)
torch.save((imgs, labels), "/tmp/tune/plain2400.pt")
with torch.no_grad():
    lo = oracle(imgs)
    pred = lo.argmax(1)
    oconf = lo.softmax(1)[torch.arange(len(labels)), labels]
correct = pred == labels
print("oracle agreement plain pool (2400):", float(correct.float().mean()))
print("per class", [round(float(correct[labels == k].float().mean()), 2) for k in range(10)])
# real D_r agreement
with torch.no_grad():
    print("oracle on D_r", float((oracle(splits.train.images).argmax(1) == splits.train.labels).float().mean()))
# TODV
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
for feats in [("loss",), ("loss", "margin", "entropy")]:
    t = time.time()
    v = fit_valuation(
        splits.train,
        pool0,
        splits.meta,
        BiLevelConfig(steps=150, batch_size=64, meta_batch_size=50, progress=False, features=feats),
    )
    print(feats, "todv s", round(time.time() - t, 1))
    if feats == ("loss",):
        g_, w_ = v.curve(torch.linspace(0, 6, 13))
        print("curve", [round(float(x), 3) for x in w_])
    u = v.score(imgs, labels)
    with torch.no_grad():
        vloss = F.cross_entropy(v.classifier(imgs), labels, reduction="none")

    def auroc(score, pos):
        s = score[pos]
        n = score[~pos]
        return float(
            (s.view(-1, 1) > n.view(1, -1)).float().mean() + 0.5 * (s.view(-1, 1) == n.view(1, -1)).float().mean()
        )

    print(
        " utility mean",
        float(u.mean()),
        "std",
        float(u.std()),
        "AUROC(util, oracle-correct)",
        auroc(u, correct),
        "AUROC(-todv loss, correct)",
        auroc(-vloss, correct),
    )
    with torch.no_grad():
        print(" todv classifier val acc", float((v.classifier(val.images).argmax(1) == val.labels).float().mean()))
    # quantiles: oracle correctness by utility decile
    order = torch.argsort(u)
    dec = [round(float(correct[order[i * 240 : (i + 1) * 240]].float().mean()), 2) for i in range(10)]
    print(" oracle-correct by utility decile (low->high)", dec)
    print(" oracle conf by decile", [round(float(oconf[order[i * 240 : (i + 1) * 240]].mean()), 2) for i in range(10)])
