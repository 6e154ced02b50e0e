"""train_configs/: timm train.py configs against train.py's recorded interface and the authors' recipe.

train.py's interface (every argument with its flags, default, nargs, type) is read from
``tests/data/timm_train_args.json``; ``train_replica`` rebuilds train.py's parsers from it. The
expected recipe values are the authors' ImageNet-1k recipe: the launch commands of ``smp_imagenet/README.md`` and
the defaults of ``smp_imagenet/main.py`` in their repository (github.com/sangnekim/SMPConv).
"""
import copy
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.auto_augment import rand_augment_transform
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs

from smpconv_timm import MODEL_NAMES, SMPConv2d
from smpconv_timm.train_check import TrainConfigError, check_running_train_script, config_problems, \
    validate_train_config
from train_replica import CONFIGS, build_parsers, header_command, load_args, parse_train_args, train_args_json, \
    train_py_argv

CONFIG_FILES = sorted(CONFIGS.glob('*.yaml'))
IN1K = {'smpconv_t': CONFIGS / 'smpconv_t_in1k.yaml', 'smpconv_b': CONFIGS / 'smpconv_b_in1k.yaml'}

# the authors' ImageNet-1k recipe (smp_imagenet/README.md's commands, smp_imagenet/main.py's defaults), as train.py
# argument values
RECIPE = dict(
    opt='adamw', opt_eps=1e-8, lr=4e-3, weight_decay=0.05, sched='cosine', min_lr=1e-6, model_ema=True,
    model_ema_decay=0.9999, train_interpolation='random', color_jitter=0.4, reprob=0.25, remode='pixel',
    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, mixup_mode='batch', smoothing=0.1, hflip=0.0,
    scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3], crop_pct=0.875, interpolation='bicubic', amp=False, sync_bn=True,
    mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], num_classes=1000,
)
RELEASE_RANDAUGMENT = 'rand-m9-mstd0.5-inc1'
PER_GPU = {'smpconv_t': (256, 2, 0.1), 'smpconv_b': (128, 4, 0.5)}  # batch, accumulation, drop path


@pytest.fixture(scope='module')
def interface() -> Path:
    return train_args_json()


def launch_args(config: Path):
    """(processes, train.py arguments) of the config's header command, placeholders filled in."""
    nproc, argv = train_py_argv(header_command(config))
    return nproc, ['5' if a == 'N' else a for a in argv]


def _typed(value, type_name) -> bool:
    if type_name is None:
        return True
    if type_name == 'float':
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {'int': int, 'str': str}[type_name]) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# every config against the interface

@pytest.mark.parametrize('config', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_keys_are_train_py_arguments_with_valid_values(interface, config):
    cfg = yaml.safe_load(config.read_text())
    spec = load_args(interface)
    unknown = sorted(set(cfg) - set(spec))
    assert not unknown, f'not train.py arguments: {unknown}'
    for key, value in cfg.items():
        s = spec[key]
        if s['nargs'] == 0:
            assert isinstance(value, bool), key
        elif isinstance(s['default'], dict):
            assert isinstance(value, dict), key
        elif s['nargs'] in ('+', '*') or isinstance(s['nargs'], int):
            assert isinstance(value, list) and value, key
            assert not isinstance(s['nargs'], int) or len(value) == s['nargs'], key
            assert all(_typed(v, s['type']) for v in value), key
        else:  # our files write real numbers (`4.0e-3`, not PyYAML's string `4e-3`)
            assert value is not None and _typed(value, s['type']), (key, value)
    assert cfg['device_modules'] == ['smpconv_timm.train_check']
    assert config_problems(cfg, interface) == []
    assert validate_train_config(config, interface) == cfg

    # what train.py ends up with: every config value reaches its argument unchanged
    args = parse_train_args(interface, ['-c', str(config)])
    for key, value in cfg.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize('config', CONFIG_FILES, ids=lambda p: p.stem)
def test_header_launch_command_runs_this_config(interface, config):
    nproc, argv = launch_args(config)
    assert argv[argv.index('-c') + 1] == f'train_configs/{config.name}'
    assert '--data-dir' in argv
    args = parse_train_args(interface, [str(config) if a == f'train_configs/{config.name}' else a for a in argv])
    assert args.data_dir.startswith('/path/to/')
    assert nproc in (None, 4)


@pytest.mark.parametrize('config', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_builds_what_train_py_builds_from_it(interface, config):
    """The data config, train transform, mixup, optimizer and scheduler train.py makes, from this file."""
    nproc, argv = launch_args(config)
    args = parse_train_args(interface, argv + ['--num-classes', '5'] if '--num-classes' not in argv else argv)
    data_config = resolve_data_config(vars(args), pretrained_cfg=timm.get_pretrained_cfg(args.model).to_dict())
    transform = create_transform(
        data_config['input_size'], is_training=True, scale=args.scale, ratio=args.ratio, hflip=args.hflip,
        vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=args.aa, interpolation=args.train_interpolation,
        re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, mean=data_config['mean'], std=data_config['std'])
    names = [type(t).__name__ for t in transform.transforms]
    assert 'RandAugment' in names and 'RandomErasing' in names
    assert ('RandomHorizontalFlip' in names) == (args.hflip > 0)
    if args.mixup or args.cutmix:
        Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
              switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
              num_classes=args.num_classes)
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = create_optimizer_v2([param], **optimizer_kwargs(cfg=args))
    assert type(optimizer) is torch.optim.AdamW
    _, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=10)
    assert epochs == args.epochs + (args.warmup_epochs if args.warmup_prefix else 0)


def test_randaugment_cap_keeps_posterize_in_range():
    """The release policy can ask Pillow for 0 bits at magnitude 10; the configs' cap at 9 cannot."""
    def fewest_bits(aa):
        ops = rand_augment_transform(aa, {'translate_const': 100, 'img_mean': (124, 116, 104)}).ops
        op = next(o for o in ops if o.name == 'PosterizeIncreasing')
        top = op.magnitude_max or 10
        return min(op.level_fn(m, op.hparams)[0] for m in np.linspace(op.magnitude - 6 * op.magnitude_std, top))
    assert fewest_bits(RELEASE_RANDAUGMENT) == 0
    for config in CONFIG_FILES:
        aa = yaml.safe_load(config.read_text())['aa']
        assert aa == RELEASE_RANDAUGMENT + '-mmax9'
        assert fewest_bits(aa) == 1


# ---------------------------------------------------------------------------------------------------------
# the ImageNet-1k recipe

@pytest.mark.parametrize('model', IN1K)
def test_in1k_config_is_the_authors_recipe(interface, model):
    config = IN1K[model]
    nproc, argv = launch_args(config)
    args = parse_train_args(interface, argv)
    for key, value in RECIPE.items():
        assert getattr(args, key) == pytest.approx(value), key
    assert args.aa.startswith(RELEASE_RANDAUGMENT)
    batch, accum, drop_path = PER_GPU[model]
    assert (nproc, args.batch_size, args.grad_accum_steps) == (4, batch, accum)  # as the authors ran it
    assert nproc * args.batch_size * args.grad_accum_steps == 2048
    assert args.drop_path == drop_path and args.model == model and args.device_modules == ['smpconv_timm.train_check']
    assert args.opt_betas == [0.9, 0.999]  # the AdamW defaults the release leaves in place
    data_config = resolve_data_config(vars(args), pretrained_cfg=timm.get_pretrained_cfg(model).to_dict())
    assert data_config['input_size'] == (3, 224, 224)
    assert data_config['crop_pct'] == 0.875 and data_config['interpolation'] == 'bicubic'


def release_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs, start_warmup_value=0.):
    """The release's per-iteration lr schedule (smp_imagenet/utils.py cosine_scheduler), as written there."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize('model', IN1K)
def test_in1k_schedule_is_the_release_schedule(interface, model):
    args = parse_train_args(interface, launch_args(IN1K[model])[1])
    updates = 7  # updates per epoch; the shape of the schedule does not depend on it
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = create_optimizer_v2([param], **optimizer_kwargs(cfg=args))
    scheduler, epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates)
    assert epochs == 300 and not scheduler.t_in_epochs
    timm_lr = []
    for t in range(epochs * updates):  # train.py: the update after `t` earlier ones runs at the lr of step t
        scheduler.step_update(num_updates=t)
        timm_lr.append(optimizer.param_groups[0]['lr'])
    release = release_cosine_scheduler(4e-3, 1e-6, 300, updates, 10)
    warm = 10 * updates
    np.testing.assert_allclose(timm_lr[warm:], release[warm:], rtol=1e-12, atol=0)
    assert timm_lr[0] == release[0] == 0.
    # the warmup ramps to the peak one update later than the release's linspace: never more than a step apart
    assert np.abs(np.array(timm_lr[:warm]) - release[:warm]).max() <= 4e-3 / (warm - 1) + 1e-15


# ---------------------------------------------------------------------------------------------------------
# fine-tuning configs

@pytest.mark.parametrize('model', MODEL_NAMES)
def test_finetune_configs(interface, model):
    ft384 = parse_train_args(interface, launch_args(CONFIGS / f'{model}_in1k_ft384.yaml')[1])
    nproc, argv = launch_args(CONFIGS / f'{model}_in1k_ft384.yaml')
    assert ft384.pretrained and ft384.num_classes == 1000 and ft384.input_size == [3, 384, 384]
    assert ft384.crop_pct == 1.0 and ft384.mixup == ft384.cutmix == 0.
    assert nproc * ft384.batch_size * ft384.grad_accum_steps == 512 and ft384.lr == 5e-5
    assert ft384.head_init_scale is None  # train.py would scale the pretrained 1000-class head away

    downstream = parse_train_args(interface, launch_args(CONFIGS / f'{model}_finetune_imagefolder.yaml')[1])
    assert downstream.pretrained and downstream.num_classes == 5  # from the command line's --num-classes N

    # layer decay over the model's group_matcher: the stem at ~1 % of the lr (ConvNeXt's 0.7 ** 13), as
    # the headers say, and the classifier at the full lr
    net = timm.create_model(model, num_classes=5)
    layers = group_parameters(net, net.group_matcher(coarse=False), reverse=True)
    deepest = max(layers.values())
    assert layers['head.fc.weight'] == deepest and layers['stem.0.conv.weight'] == 0
    for args in (ft384, downstream):
        stem_scale = args.layer_decay ** deepest
        assert 0.005 < stem_scale < 0.02 and abs(math.log(stem_scale / 0.7 ** 13)) < math.log(1.5)


# ---------------------------------------------------------------------------------------------------------
# the release's parameter groups under timm's optimizer factory

def release_weight_decay(name: str, param: torch.Tensor, weight_decay: float) -> float:
    """smp_imagenet/optim_factory.py: no decay on 1-D params, biases, point positions and radii."""
    if param.ndim == 1 or name.endswith('.bias') or 'weight_coord' in name or 'radius' in name:
        return 0.
    return weight_decay


def cosine_lr(t: int, args) -> float:
    """The config's lr at update t (past the warmup): a cosine from lr to min_lr over `epochs`, which start
    after the warmup with warmup_prefix (the release's schedule) and at update 0 without."""
    t = t - args.warmup_epochs * UPDATES if args.warmup_prefix else t
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t / (args.epochs * UPDATES)))


UPDATES = 3


@pytest.mark.parametrize('config', ['smpconv_t_in1k', 'smpconv_t_finetune_imagefolder', 'smpconv_b_in1k_ft384'])
def test_param_groups_put_positions_and_radii_in_no_decay_groups(interface, config):
    args = parse_train_args(interface, launch_args(CONFIGS / f'{config}.yaml')[1])
    model = timm.create_model(args.model, num_classes=5)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    decay_of = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)
    got = {n: decay_of[id(p)] for n, p in names.items()}
    expected = {n: release_weight_decay(n, p, args.weight_decay) for n, p in names.items()}
    assert got == expected
    smp_params = [n for n in names if n.endswith(('.weight_coord', '.radius'))]
    assert len(smp_params) == 2 * sum(isinstance(m, SMPConv2d) for m in model.modules()) > 0
    assert all(got[n] == 0. for n in smp_params)
    if args.layer_decay is not None:
        assert len({g['lr_scale'] for g in optimizer.param_groups}) > 20


@pytest.mark.parametrize('config', ['smpconv_t_in1k', 'smpconv_t_finetune_imagefolder'])
def test_radii_step_at_a_tenth_of_the_scheduled_lr(interface, config):
    """create_optimizer_v2 + create_scheduler_v2 from the config vs. explicit release-style param groups.

    The reference: torch's AdamW with one group per parameter at the release's lr (scheduled lr x layer
    scale, x 0.1 for radii) and weight decay; a group of one radius keeps its lr (the radius-lr rule). Both step on
    the same gradients; with and without layer decay every parameter must land in the same place.
    """
    args = parse_train_args(interface, launch_args(CONFIGS / f'{config}.yaml')[1])
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=5, drop_path_rate=0.)
    twin = copy.deepcopy(model)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args))
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=UPDATES)
    warm = args.warmup_epochs * UPDATES

    if args.layer_decay is not None:  # layer scales from the model's group_matcher, as BEiT-style decay defines
        layer_of = group_parameters(twin, twin.group_matcher(coarse=False), reverse=True)
        deepest = max(layer_of.values())
        scale = {n: args.layer_decay ** (deepest - layer_of[n]) for n, _ in twin.named_parameters()}
    else:
        scale = {n: 1. for n, _ in twin.named_parameters()}
    groups = [dict(params=[p], name=n, weight_decay=release_weight_decay(n, p, args.weight_decay),
                   base=scale[n] * (0.1 if n.endswith('.radius') else 1.))
              for n, p in twin.named_parameters()]
    reference = torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps, betas=tuple(args.opt_betas))

    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 3])
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith('.radius')}
    model.train(), twin.train()
    for t in range(warm + 5, warm + 8):
        scheduler.step_update(num_updates=t)
        for g in reference.param_groups:
            g['lr'] = cosine_lr(t, args) * g['base']
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    moved = 0.
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-9, msg=n)
        if n in start:
            moved = max(moved, (p - start[n]).abs().max().item())
    assert moved > 1e-6  # radii did move: 3 AdamW steps of 0.1 x lr x scale each, far above the tolerance


# ---------------------------------------------------------------------------------------------------------
# bad input: unknown keys, models, ill-typed values

BAD = {'warmup_epoch': 10, 'model': 'smpconv_tt', 'epochs': 300.5, 'scale': 0.08}


def test_validate_train_config_names_every_bad_key(interface, tmp_path):
    cfg = dict(yaml.safe_load(IN1K['smpconv_t'].read_text()), **BAD)
    path = tmp_path / 'bad.yaml'
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(TrainConfigError) as e:
        validate_train_config(path, interface)
    message = str(e.value)
    for key in BAD:
        assert repr(key) in message, key
    assert "did you mean 'warmup_epochs'" in message and 'smpconv_t' in message
    ok = dict(cfg, aa=RELEASE_RANDAUGMENT)
    del ok['warmup_epoch']
    problems = config_problems(dict(ok, model='smpconv_t', epochs=300, scale=[0.08, 1.]), interface)
    assert [p.split(':')[0] for p in problems] == (["'aa'"] if pillow_rejects_zero_bits() else [])


def pillow_rejects_zero_bits() -> bool:
    from PIL import Image, ImageOps
    try:
        ImageOps.posterize(Image.new('L', (1, 1)), 0)
    except ValueError:
        return True
    return False


def fake_train_main(monkeypatch, interface, cfg: dict, argv: list):
    """Make ``__main__`` look like timm's train.py after its ``_parse_args()``: its two global parsers."""
    config_parser, parser = build_parsers(interface)
    parser.set_defaults(**cfg)
    main = types.ModuleType('__main__')
    main.config_parser, main.parser = config_parser, parser
    monkeypatch.setitem(sys.modules, '__main__', main)
    monkeypatch.setattr(sys, 'argv', ['train.py', '-c', 'cfg.yaml'] + argv)


def test_check_inside_train_py(interface, monkeypatch):
    cfg = yaml.safe_load(IN1K['smpconv_t'].read_text())
    check_running_train_script()  # pytest's __main__ is no train.py: nothing to check

    for config in CONFIG_FILES:  # our configs pass
        fake_train_main(monkeypatch, interface, yaml.safe_load(config.read_text()), ['--data-dir', '/d'])
        check_running_train_script()

    fake_train_main(monkeypatch, interface, dict(cfg, **BAD), ['--data-dir', '/d'])
    with pytest.raises(TrainConfigError) as e:
        check_running_train_script()
    assert all(repr(k) in str(e.value) for k in BAD) and 'cfg.yaml' in str(e.value)

    # values the command line overrides are not the config's problem; a bad --model is
    fake_train_main(monkeypatch, interface, dict(cfg, epochs=300.5, model='nope'),
                    ['--epochs', '3', '--model', 'smpconv_b'])
    check_running_train_script()
    fake_train_main(monkeypatch, interface, cfg, ['--model', 'smpconv_q'])
    with pytest.raises(TrainConfigError, match="'--model': 'smpconv_q' is not a registered timm model"):
        check_running_train_script()

    # the release's exact RandAugment policy on the command line: refused where Pillow would crash on it
    fake_train_main(monkeypatch, interface, cfg, ['--aa', RELEASE_RANDAUGMENT])
    if pillow_rejects_zero_bits():
        with pytest.raises(TrainConfigError, match="'--aa': 'rand-m9-mstd0.5-inc1' can draw PosterizeIncreasing"):
            check_running_train_script()
    else:
        check_running_train_script()


FAKE_TRAIN_PY = '''
import importlib, site, sys
site.addsitedir({autoload!r})  # the package as installed: the models are registered when timm is imported
sys.path.insert(0, {tests!r})
import timm  # train.py imports timm (and so smpconv_timm) long before it parses its arguments
assert timm.is_model('smpconv_t')
import yaml
from train_replica import build_parsers

config_parser, parser = build_parsers({interface!r})


def _parse_args():  # train.py's, line for line in what it does
    args_config, remaining = config_parser.parse_known_args()
    if args_config.config:
        with open(args_config.config, 'r') as f:
            cfg = yaml.safe_load(f)
            parser.set_defaults(**cfg)
    return parser.parse_args(remaining)


def main():
    args = _parse_args()
    if args.device_modules:
        for module in args.device_modules:
            importlib.import_module(module)
    open({marker!r}, 'w').write('train.py went on to create the model and read the data')


if __name__ == '__main__':
    main()
'''


def test_bad_config_stops_train_py_before_any_data_is_read(interface, tmp_path):
    """A train.py stand-in: timm imported first, with the package's autoload hook (the models registered then),
    train.py's parsing from the recorded interface, then its device-module import."""
    marker = tmp_path / 'data_read'
    script = tmp_path / 'train.py'
    root = Path(__file__).parents[1]
    script.write_text(FAKE_TRAIN_PY.format(autoload=str(root / 'smpconv_timm' / '_autoload'), tests=str(root / 'tests'),
                                           interface=str(interface), marker=str(marker)))
    bad = tmp_path / 'bad.yaml'
    bad.write_text(IN1K['smpconv_t'].read_text() + 'warmup_epoch: 10\nmodel: smpconv_tt\n')
    run = subprocess.run([sys.executable, str(script), '-c', str(bad), '--data-dir', str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and not marker.exists()
    assert 'TrainConfigError' in run.stderr
    assert "'warmup_epoch' is not a train.py argument" in run.stderr
    assert "'model': 'smpconv_tt' is not a registered timm model" in run.stderr
