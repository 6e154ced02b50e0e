"""Real images: a small SMPConv learns scikit-learn's handwritten digits from scratch with timm's training pieces.

The recipe of ``benchmarks/digits_train.yaml`` (timm's train.py on the same data) run in-process with timm's
pieces: ``timm.create_model``, ``create_optimizer_v2`` (AdamW), a timm cosine scheduler stepped per update
with a warmup, ``ModelEmaV3`` at decay 0.999 with its decay warmup, label smoothing. To fit the default suite
it runs at 16x16 instead of 32x32, with random 1-pixel shifts instead of random resized crops, 20 epochs, one
thread (tiny tensors: a second intra-op thread costs more than it gives, 4x the CPU time on a busy 2-core
machine). The held-out split is the stratified 20 % of the 1,797 scans that training never sees.
"""
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits  # a dev dependency: the test must not skip without it
from sklearn.model_selection import train_test_split
from timm.loss import LabelSmoothingCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy

import smpconv_timm  # noqa: F401  registers the models

SMALL = dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), kernel_sizes=(13, 13, 11, 5))
IMG_SIZE = 16
EPOCHS = 20
BATCH = 64


def _digits(seed: int = 0):
    digits = load_digits()
    x_train, x_val, y_train, y_val = train_test_split(
        digits.images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed)

    def to_tensor(x):
        x = torch.from_numpy(np.asarray(x, dtype=np.float32) / 16.).unsqueeze(1)  # scans hold 0..16
        x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode='bilinear', align_corners=False)
        return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    return to_tensor(x_train), torch.from_numpy(y_train), to_tensor(x_val), torch.from_numpy(y_val)


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (zero-padded), one offset per batch."""
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    x = F.pad(x, (max_shift,) * 4, value=-1.)
    h, w = x.shape[-2:]
    return x[..., max_shift + dy:h - max_shift + dy, max_shift + dx:w - max_shift + dx]


@torch.no_grad()
def _top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    logits = torch.cat([model(xb) for xb in x.split(256)])
    return accuracy(logits, y, topk=(1,))[0].item()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_small_smpconv_learns_digits_with_ema_warmup(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x_train, y_train, x_val, y_val = _digits()
    assert len(x_train) == 1437 and len(x_val) == 360 and set(y_val.tolist()) == set(range(10))

    model = timm.create_model('smpconv_t', num_classes=10, **SMALL).to(memory_format=torch.channels_last)
    updates_per_epoch = len(x_train) // BATCH
    optimizer = create_optimizer_v2(model, 'adamw', lr=2e-3, weight_decay=0.05)
    scheduler, _ = create_scheduler_v2(
        optimizer, 'cosine', num_epochs=EPOCHS, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    ema = ModelEmaV3(model, decay=0.999, use_warmup=True)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=0.1)

    start = time.time()
    num_updates = 0
    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(updates_per_epoch):
            idx = order[i * BATCH:(i + 1) * BATCH]
            loss = loss_fn(model(_shift(x_train[idx], gen)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates)
            ema.update(model, step=num_updates)
        scheduler.step(epoch + 1)
    train_s = time.time() - start

    raw_top1 = _top1(model, x_val, y_val)
    ema_top1 = _top1(ema.module, x_val, y_val)
    print(f'digits, {EPOCHS} epochs in {train_s:.0f} s: raw top-1 {raw_top1:.2f}, EMA top-1 {ema_top1:.2f}')
    assert ema_top1 >= 95.0, (raw_top1, ema_top1)
