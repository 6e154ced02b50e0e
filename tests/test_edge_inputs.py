"""Inputs at the edges behave as in PyTorch on every path: non-finite pixels, empty batches."""
import copy

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from smpconv_timm.config import set_dwconv_algorithms, set_inference_fast_path, set_training_recompute

from test_fastpath import randomise_bn

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5))


def no_grad(fn, x, autocast=None, fast=True):
    with torch.no_grad(), set_inference_fast_path(fast), torch.autocast('cpu', autocast, enabled=autocast is not None):
        return fn(x)


def forced(algo, run):
    def run_forced(x):
        with set_dwconv_algorithms(forward=algo):
            return run(x)
    return run_forced


@pytest.fixture(scope='module', params=['auto', 'direct', 'fft', 'toeplitz'])
def eval_paths(request):
    """name -> run(x) for every eval path: fast path, plain modules, deploy form, autocast, weight dtypes, features;
    the large kernels by the algorithm timed fastest here, or by each one forced (each conv has them all)."""
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    deploy = reparameterize_model(model)
    cast = {dtype: copy.deepcopy(model).to(dtype) for dtype in (torch.bfloat16, torch.float16, torch.float64)}

    def features(x):
        return model.forward_intermediates(x, intermediates_only=True)
    paths = {
        'fast path': lambda x: no_grad(model, x),
        'plain modules': lambda x: no_grad(model, x, fast=False),
        'autograd on': lambda x: model(x).detach(),
        'deploy': lambda x: no_grad(deploy, x),
        'autocast bf16': lambda x: no_grad(model, x, torch.bfloat16),
        'deploy autocast bf16': lambda x: no_grad(deploy, x, torch.bfloat16),
        'autocast fp16': lambda x: no_grad(model, x, torch.float16),
        **{f'{dtype} weights': lambda x, m=m, dtype=dtype: no_grad(m, x.to(dtype)) for dtype, m in cast.items()},
        'features': lambda x: no_grad(features, x),
    }
    return {name: forced(request.param, run) for name, run in paths.items()}


@pytest.mark.parametrize('value', [float('nan'), float('inf'), -float('inf')])
def test_a_non_finite_pixel_reaches_only_its_own_image(eval_paths, value):
    x = torch.randn(3, 3, 40, 40)
    bad = x.clone()
    bad[1, 2, 17, 5] = value
    for path, run in eval_paths.items():
        out, clean = run(bad), run(x)
        if path == 'features':  # every feature map of that image has non-finite values (near the pixel)
            assert all(not f[1].isfinite().all() for f in out), path
            out, clean = (torch.cat([f.flatten(1) for f in t], 1) for t in (out, clean))
        else:  # every logit of that image says something is wrong, as the plain modules' logits do
            assert not out[1].isfinite().any(), path
        assert torch.equal(out[[0, 2]], clean[[0, 2]]), path  # and the other images' results are untouched


@pytest.mark.parametrize('recompute', [True, False])
def test_an_empty_batch_runs_forward_and_backward(recompute):
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t', **TINY)
    for mode in ('train', 'eval'):
        getattr(model, mode)()
        before = copy.deepcopy(model.state_dict())
        x = torch.randn(0, 3, 32, 32, requires_grad=True)
        with set_training_recompute(recompute):
            out = model(x)
        assert out.shape == (0, 1000)
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        # as nn.BatchNorm2d does with an empty batch: batches counted in training, statistics untouched
        assert changed == ({k for k in before if k.endswith('num_batches_tracked')} if mode == 'train' else set())
        model.zero_grad()
    with torch.no_grad():
        assert model(torch.randn(0, 3, 32, 32)).shape == (0, 1000)
        with torch.autocast('cpu', torch.bfloat16):
            assert model(torch.randn(0, 3, 32, 32)).shape == (0, 1000)
        assert reparameterize_model(model)(torch.randn(0, 3, 32, 32)).shape == (0, 1000)
        assert [f.shape[0] for f in model.forward_intermediates(torch.randn(0, 3, 32, 32))[1]] == [0] * 4
    model.train()
    with torch.autocast('cpu', torch.bfloat16):
        model(torch.randn(0, 3, 32, 32)).float().sum().backward()


def test_non_finite_weights_reach_the_logits_as_in_pytorch():
    """A NaN in the weights (a damaged checkpoint) is never hidden by a ReLU fused into the conv before it."""
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    with torch.no_grad():
        model.stem[0].conv.weight[3, 0, 1, 1] = float('nan')  # the stem's first conv, ReLU after it
    x = torch.randn(2, 3, 40, 40)
    for deploy in (False, True):
        m = reparameterize_model(model) if deploy else model
        fast, plain = no_grad(m, x), no_grad(m, x, fast=False)
        assert plain.isnan().all() and fast.isnan().all(), deploy
