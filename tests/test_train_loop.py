"""Training smpconv_t with the library pieces timm's train.py is made of, from the configs' values.

Pretraining phase: the smpconv_t ImageNet-1k config parsed the way train.py parses it (from the recorded
train.py interface), with the command-line overrides a tiny run needs: 64 px images, 3 classes, batch 8 x
2 accumulation steps, lr 2e-3, 16 epochs + 1 warmup epoch, EMA decay 0.9 (0.9999 would not move in 51
updates; with half as many, whether 12 held-out images come out right after training depends on the CPU's
float rounding). Everything else is the config's: AdamW with its eps / betas / weight decay, the per-update
cosine with a warmup prefix, RandAugment, random erasing, mixup + cutmix with label smoothing, no flip,
drop path 0.1, fp32 without a loss scaler (train.py's path when `amp: false`). The real smpconv_t
architecture is trained, not a shrunk one.

Fine-tuning phase: the downstream config (layer decay 0.85) from the pretraining checkpoint, loaded the
way train.py's --pretrained-path loads it, with bf16 autocast + NativeScaler (AMP on CPU) and gradient
accumulation.

After every optimizer step each radius and each point position must be where AdamW's own formula, applied
to the optimizer state, puts it with the paper's ratios (radius 0.1 x its group's lr, position 1 x),
radii clamped to [1e-3, 1]; a quarter of the radii start at the upper bound so that the clamp is exercised.
The EMA copy's radii are checked after every EMA update.
"""
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import DropPath
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, random_seed

from smpconv_timm import RADIUS_MAX, RADIUS_MIN, SMPConv2d, config
from train_replica import CONFIGS, parse_train_args, train_args_json

COLOURS = ((215, 45, 40), (40, 190, 60), (45, 60, 210))  # one class per colour, plus a stripe per class


def write_image_folder(root: Path, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = root / f'class_{c}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = np.array(colour, dtype=np.float64)[None, None] + rng.normal(0, 20, (72, 72, 3))
            img *= rng.uniform(0.75, 1.15)
            if c == 0:
                img[::8] = 255.  # horizontal lines
            elif c == 1:
                img[:, ::8] = 255.  # vertical lines
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f'{i}.png')


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('imagefolder')
    write_image_folder(root / 'train', 16, seed=0)
    write_image_folder(root / 'val', 4, seed=1)
    return root


class StepChecker:
    """Checks each AdamW step against AdamW's formula on the optimizer state: radius 0.1 x lr, then clamped."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.layers = [m for m in model.modules() if isinstance(m, SMPConv2d)]
        self.optimizer = optimizer
        self.group_of = {id(p): g for g in optimizer.param_groups for p in g['params']}
        self.clamped = 0  # radii an unclamped step would have pushed past a bound
        self.moved_radii = 0
        self.steps = 0

    def snapshot(self):
        return [(m.radius.detach().clone(), m.weight_coord.detach().clone()) for m in self.layers]

    def _adam_update(self, p: torch.Tensor) -> torch.Tensor:
        group, state = self.group_of[id(p)], self.optimizer.state[p]
        assert group['weight_decay'] == 0.  # positions and radii take no weight decay
        beta1, beta2 = group['betas']
        step = float(state['step'])
        m_hat = state['exp_avg'] / (1 - beta1 ** step)
        denom = (state['exp_avg_sq'] / (1 - beta2 ** step)).sqrt() + group['eps']
        return -group['lr'] * m_hat / denom

    def check(self, before) -> None:
        self.steps += 1
        for m, (radius, coord) in zip(self.layers, before):
            r = m.radius.detach()
            assert r.min() >= RADIUS_MIN and r.max() <= RADIUS_MAX
            unclamped = radius + 0.1 * self._adam_update(m.radius)
            self.clamped += int(((unclamped > RADIUS_MAX) | (unclamped < RADIUS_MIN)).sum())
            self.moved_radii += int((r != radius).sum())
            torch.testing.assert_close(r, unclamped.clamp(RADIUS_MIN, RADIUS_MAX), rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(m.weight_coord.detach(), coord + self._adam_update(m.weight_coord),
                                       rtol=1e-5, atol=1e-8)


def assert_radii_in_range(module: torch.nn.Module) -> None:
    radii = torch.cat([m.radius.detach().flatten() for m in module.modules() if isinstance(m, SMPConv2d)])
    assert radii.numel() > 0
    assert radii.min() >= RADIUS_MIN and radii.max() <= RADIUS_MAX, (radii.min(), radii.max())


@torch.no_grad()
def clean_loss(model: torch.nn.Module, loader) -> tuple:
    """Loss and accuracy on un-augmented images with BatchNorm on batch statistics (a copy, no drop path).

    After 51 updates from scratch the BN running averages still lag the weights (eval mode predicts one
    class); batch statistics show what the weights have learned. The copy stays in train mode (drop path
    off): in eval mode the model's inference fast path folds the running statistics in.
    """
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, DropPath):
            m.eval()
    x, y = next(iter(loader))
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> tuple:
    model.eval()
    logits, targets = zip(*[(model(x), y) for x, y in loader])
    logits, targets = torch.cat(logits), torch.cat(targets)
    return F.cross_entropy(logits, targets).item(), (logits.argmax(1) == targets).float().mean().item(), logits


def train_epochs(model, loader, optimizer, scheduler, args, mixup_fn, loss_fn, ema, checker, epochs,
                 amp: bool, scaler=None):
    """train.py's train_one_epoch, in the few lines the test needs: accumulation, EMA, per-update lr."""
    losses = []
    accum = args.grad_accum_steps
    updates_per_epoch = (len(loader) + accum - 1) // accum
    num_updates = 0
    for epoch in range(epochs):
        model.train()
        optimizer.zero_grad()
        for i, (x, y) in enumerate(loader):
            need_update = (i + 1) % accum == 0 or i + 1 == len(loader)
            x, y = mixup_fn(x, y)
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(x), y)
            losses.append(loss.item())
            before = checker.snapshot() if need_update else None
            if scaler is not None:
                scaler(loss / accum, optimizer, need_update=need_update)
            else:
                (loss / accum).backward()
                if need_update:
                    optimizer.step()
            if not need_update:
                continue
            checker.check(before)
            optimizer.zero_grad()
            num_updates += 1
            ema.update(model, step=num_updates)
            assert_radii_in_range(ema.module)
            scheduler.step_update(num_updates=num_updates)
        scheduler.step(epoch + 1)
    assert num_updates == epochs * updates_per_epoch
    return losses


def make_loaders(args, model, root: Path, batch_size: int):
    data_config = resolve_data_config(vars(args), model=model)
    train_set = create_dataset(args.dataset, root=str(root), split=args.train_split, is_training=True)
    val_set = create_dataset(args.dataset, root=str(root), split=args.val_split, is_training=False)
    assert len(train_set) == 48 and len(val_set) == 12
    train_loader = create_loader(
        train_set, input_size=data_config['input_size'], batch_size=batch_size, is_training=True,
        use_prefetcher=False, no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, mean=data_config['mean'],
        std=data_config['std'], num_workers=0, device=torch.device('cpu'))
    val_loader = create_loader(
        val_set, input_size=data_config['input_size'], batch_size=12, is_training=False, use_prefetcher=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], num_workers=0, device=torch.device('cpu'))
    return train_loader, val_loader


def mixup_for(args) -> Mixup:
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=args.num_classes)


@pytest.fixture
def fixed_dwconv_algorithms():
    """The large-kernel and 1x1 algorithms fixed instead of timed: which one wins depends on the machine and its load,
    and their float rounding differs, which a run of a few dozen steps on a few dozen images amplifies."""
    with config.set_dwconv_algorithms(forward='direct', input_grad='direct', weight_grad='fft', pointwise='conv'):
        yield


@pytest.mark.slow
def test_training_with_timm_library_pieces(image_folder, tmp_path, fixed_dwconv_algorithms):
    interface = train_args_json()
    random_seed(42)  # as train.py: torch, numpy (Mixup) and random (RandAugment)
    args = parse_train_args(interface, [
        '-c', str(CONFIGS / 'smpconv_t_in1k.yaml'), '--data-dir', str(image_folder), '--device', 'cpu',
        '--input-size', '3', '64', '64', '--num-classes', '3', '--batch-size', '8', '--grad-accum-steps', '2',
        '--lr', '2e-3', '--epochs', '16', '--warmup-epochs', '1', '--warmup-lr', '2e-4',
        '--model-ema-decay', '0.9', '--workers', '0', '--no-prefetcher'])
    # what the config itself says and this run keeps
    assert (args.opt, args.weight_decay, args.opt_eps, args.model_ema, args.amp) == ('adamw', 0.05, 1e-8, True, False)
    assert args.mixup > 0 and args.cutmix > 0 and args.aa and args.reprob > 0 and args.sched_on_updates

    model = timm.create_model(args.model, num_classes=args.num_classes, drop_rate=args.drop,
                              drop_path_rate=args.drop_path)
    smp = [m for m in model.modules() if isinstance(m, SMPConv2d)]
    with torch.no_grad():
        for m in smp:  # a quarter of the points start at the upper bound: about half get pushed past it
            m.radius[:, :m.n_points // 4] = RADIUS_MAX

    train_loader, val_loader = make_loaders(args, model, image_folder, args.batch_size)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    ema = ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup)
    updates_per_epoch = (len(train_loader) + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args, decreasing_metric=False), updates_per_epoch=updates_per_epoch)
    assert num_epochs == 17 and updates_per_epoch == 3

    loss_start, acc_start = clean_loss(model, val_loader)
    checker = StepChecker(model, optimizer)
    losses = train_epochs(model, train_loader, optimizer, scheduler, args, mixup_for(args),
                          SoftTargetCrossEntropy(), ema, checker, num_epochs, amp=False)
    loss_end, acc_end = clean_loss(model, val_loader)
    ema_loss, ema_acc = clean_loss(ema.module, val_loader)

    assert checker.steps == 51 and checker.clamped > 0 and checker.moved_radii > 0
    third = len(losses) // 3
    assert np.mean(losses[-third:]) < np.mean(losses[:third]) - 0.3  # train loss (mixed targets) falls ...
    # ... and so does the loss on held-out clean images, for the model and its EMA
    assert loss_end < loss_start - 0.1 and acc_end >= 2 / 3, (loss_start, loss_end, acc_start, acc_end)
    assert ema_loss < loss_start - 0.1 and ema_acc >= 2 / 3, (loss_start, ema_loss, ema_acc)
    ema_logits = evaluate(ema.module, val_loader)[2]

    # CheckpointSaver as train.py uses it: raw + EMA weights, the best one linked to model_best.pth.tar
    saver = CheckpointSaver(model=model, optimizer=optimizer, args=args, model_ema=ema, amp_scaler=None,
                            checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path), decreasing=False,
                            max_history=1)
    saver.save_checkpoint(num_epochs - 1, metric=100 * ema_acc)
    best = tmp_path / 'model_best.pth.tar'
    assert best.is_file()

    overlay = dict(file=str(best), num_classes=args.num_classes)
    reloaded = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay,
                                 num_classes=args.num_classes)
    torch.testing.assert_close(evaluate(reloaded, val_loader)[2], ema_logits, rtol=1e-5, atol=1e-5)
    raw = timm.create_model(args.model, pretrained=True, pretrained_cfg_overlay=overlay,
                            num_classes=args.num_classes, pretrained_ema=False)
    torch.testing.assert_close(evaluate(raw, val_loader)[2], evaluate(model, val_loader)[2], rtol=1e-5, atol=1e-5)

    # fine-tuning: the downstream config from that checkpoint as train.py --pretrained-path loads it
    # (head re-made), layer decay, bf16 autocast + NativeScaler, accumulation
    ft_args = parse_train_args(interface, [
        '-c', str(CONFIGS / 'smpconv_t_finetune_imagefolder.yaml'), '--data-dir', str(image_folder),
        '--device', 'cpu', '--num-classes', '3', '--input-size', '3', '64', '64', '--batch-size', '8',
        '--grad-accum-steps', '2', '--epochs', '1', '--warmup-epochs', '0', '--lr', '1e-3',
        '--amp', '--amp-dtype', 'bfloat16', '--pretrained-path', str(best), '--workers', '0', '--no-prefetcher'])
    assert ft_args.layer_decay is not None and ft_args.pretrained
    ft_model = timm.create_model(
        ft_args.model, pretrained=ft_args.pretrained, num_classes=ft_args.num_classes,
        drop_path_rate=ft_args.drop_path, pretrained_cfg_overlay=dict(file=ft_args.pretrained_path, num_classes=-1))
    ema_state = ema.module.state_dict()
    for k, v in ft_model.state_dict().items():
        if not k.startswith('head.fc.'):
            torch.testing.assert_close(v, ema_state[k], rtol=0, atol=0, msg=k)
    assert not torch.equal(ft_model.head.fc.weight, ema_state['head.fc.weight'])  # the head is new

    ft_train_loader, _ = make_loaders(ft_args, ft_model, image_folder, ft_args.batch_size)
    ft_optimizer = create_optimizer_v2(ft_model, **optimizer_kwargs(cfg=ft_args), **ft_args.opt_kwargs)
    assert len({g['lr_scale'] for g in ft_optimizer.param_groups}) > 10  # layer-wise groups
    ft_scheduler, ft_epochs = create_scheduler_v2(
        ft_optimizer, **scheduler_kwargs(ft_args, decreasing_metric=False), updates_per_epoch=3)
    ft_ema = ModelEmaV3(ft_model, decay=0.9)
    ft_checker = StepChecker(ft_model, ft_optimizer)
    ft_losses = train_epochs(
        ft_model, ft_train_loader, ft_optimizer, ft_scheduler, ft_args, lambda x, y: (x, y),
        torch.nn.CrossEntropyLoss(label_smoothing=ft_args.smoothing), ft_ema, ft_checker, ft_epochs,
        amp=True, scaler=NativeScaler(device='cpu'))
    assert ft_checker.steps == 3 and ft_checker.moved_radii > 0
    assert all(math.isfinite(v) for v in ft_losses)
    scales = {ft_checker.group_of[id(m.radius)]['lr_scale'] for m in ft_checker.layers}
    assert len(scales) > 5 and max(scales) < 1.  # radii sit in many layer-decay groups, all below the head
