"""PyTorch's module contracts, after real train and eval passes (the state a model is in when people copy it).

Every check compares against the plain, independent route: a fresh model loaded with the same state dict.
"""
import copy
import io
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.optim import create_optimizer_v2

from smpconv_timm import RADIUS_MAX, RADIUS_MIN, SMPConv2d
from smpconv_timm.kernels import CACHE_ATTRS

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5), num_classes=7)


def used_model(**kwargs) -> nn.Module:
    """A tiny smpconv_t after two optimizer steps and eval forwards at two sizes, left in eval mode: every
    cache (SMP kernels, fused inference plans with oneDNN-packed weights) is filled."""
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t', **dict(TINY, **kwargs))
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2)
    for _ in range(2):
        model.train()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        model(torch.randn(1, 3, 40, 40).contiguous(memory_format=torch.channels_last))
    assert caches(model), 'the eval passes should have filled the inference caches'
    return model


def caches(model: nn.Module):
    return [(n, a) for n, m in model.named_modules() for a in CACHE_ATTRS if m.__dict__.get(a) is not None]


def fresh_twin(model: nn.Module, **kwargs) -> nn.Module:
    twin = timm.create_model('smpconv_t', **dict(TINY, **kwargs))
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@torch.no_grad()
def assert_same_outputs(a: nn.Module, b: nn.Module, x=None, **tol):
    x = torch.randn(2, 3, 32, 32) if x is None else x
    torch.testing.assert_close(a(x), b(x), **tol)


def test_deepcopy_after_train_and_eval():
    model = used_model()
    twin = fresh_twin(model)
    copied = copy.deepcopy(model)
    assert not caches(copied)
    assert_same_outputs(copied, twin)
    copied.train()  # the copy trains on its own parameters
    copied(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for name, module in model.named_modules():  # every submodule on its own, too
        assert not caches(copy.deepcopy(module)), name


def test_pickle_and_torch_save_after_train_and_eval(tmp_path):
    model = used_model()
    path = tmp_path / 'model.pt'
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert not caches(loaded)
    assert_same_outputs(loaded, fresh_twin(model))
    for name, module in model.named_modules():
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        assert not caches(torch.load(buffer, weights_only=False)), name


def test_caches_never_reach_the_state_dict():
    model = timm.create_model('smpconv_t', **TINY)
    keys = list(model.state_dict())
    used = used_model()
    assert list(used.state_dict()) == keys
    assert all(not k.endswith(CACHE_ATTRS) for k in keys)


def test_copies_of_the_deploy_form():
    from timm.utils import reparameterize_model
    model = used_model()
    deploy = reparameterize_model(model)
    with torch.no_grad():
        deploy(torch.randn(1, 3, 32, 32))
    assert_same_outputs(copy.deepcopy(deploy), deploy)
    buffer = io.BytesIO()
    torch.save(deploy, buffer)
    buffer.seek(0)
    assert_same_outputs(torch.load(buffer, weights_only=False), deploy)


def test_to_dtype_after_eval_drops_stale_caches():
    model = used_model()
    twin = fresh_twin(model).double()
    model.double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_same_outputs(model, twin, x, rtol=0, atol=1e-12)
    model.float()
    assert_same_outputs(model, fresh_twin(model), rtol=1e-5, atol=1e-6)
    model.to('meta')  # a device move: no cache may keep the old storage alive or be used there
    assert all(p.device.type == 'meta' for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, device='meta')).shape == (1, 7)


@pytest.mark.parametrize('how', ['device_kwarg', 'device_context'])
def test_meta_build_then_to_empty_and_load(how):
    reference = used_model()
    if how == 'device_kwarg':
        model = timm.create_model('smpconv_t', device='meta', **TINY)
    else:
        with torch.device('meta'):
            model = timm.create_model('smpconv_t', **TINY)
    assert all(t.device.type == 'meta' for t in (*model.parameters(), *model.buffers()))
    model = model.to_empty(device='cpu')
    model.load_state_dict(reference.state_dict())
    assert_same_outputs(model.eval(), reference, rtol=1e-5, atol=1e-6)
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('train', [False, True])
def test_fx_trace_forward_and_backward(train):
    model = used_model()
    model.train(train)
    traced = torch.fx.symbolic_trace(model)
    # timm's tracer too (leaf modules / functions registered with timm), as timm's feature extractor uses
    extractor = timm.models.create_feature_extractor(model, return_nodes={'head.fc': 'logits'})
    x = torch.randn(2, 3, 32, 32)
    for graph in (traced, lambda t: extractor(t)['logits']):
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(1)
        out = graph(x)
        torch.manual_seed(1)
        ref = model(x)
        if not train:  # in train mode the batch statistics match, but running stats were updated twice
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        out.logsumexp(1).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@pytest.mark.slow
def test_torch_compile_eval_and_train_step():
    model = used_model()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), twin(x), rtol=1e-4, atol=1e-5)

    model.train()
    twin.train()
    # SGD: its update is linear in the gradient, so float rounding stays rounding (Adam's first step is ~sign(g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    for m, o in ((compiled, opt), (twin, opt_twin)):
        m(x).logsumexp(1).mean().backward()
        o.step()
        o.zero_grad()
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert_step_close(p, q, n)
    radii = torch.cat([m.radius.flatten() for m in model.modules() if isinstance(m, SMPConv2d)])
    assert radii.min() >= RADIUS_MIN and radii.max() <= RADIUS_MAX


def assert_step_close(a: torch.Tensor, b: torch.Tensor, name: str):
    """Parameters after a few SGD steps (lr 0.1) along two float routes. BatchNorm over the few values of a tiny
    batch's last stages amplifies float rounding in gradients to ~1e-3 relative, so the bound is 1e-4 on the
    parameters (a step moves them by ~1e-2; a wrong gradient misses by that much)."""
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, state: dict, out: dict):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = timm.create_model('smpconv_t', **TINY)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():  # an eval pass first: the caches must not disturb DDP
            model(torch.randn(1, 3, 32, 32))
        ddp = nn.parallel.DistributedDataParallel(model.train())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(2):
            ddp(torch.randn(2, 3, 32, 32, generator=gen)).logsumexp(1).mean().backward()
            opt.step()
            opt.zero_grad()
        if rank == 0:
            out.update({k: v.clone() for k, v in model.state_dict().items()})
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gloo_two_processes_match_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    start = timm.create_model('smpconv_t', **TINY)
    state = {k: v.clone() for k, v in start.state_dict().items()}
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, _free_port(), state, out), nprocs=2, join=True)

    # one process, the same two batches of each rank side by side: BN statistics differ (per-rank batches under
    # DDP), so compare against per-rank forwards whose gradients are averaged, as DDP defines it
    model = timm.create_model('smpconv_t', **TINY)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # linear in the gradient: rounding stays small
    gens = [torch.Generator().manual_seed(r) for r in range(2)]
    model.train()
    for _ in range(2):
        for gen in gens:
            (model(torch.randn(2, 3, 32, 32, generator=gen)).logsumexp(1).mean() / 2).backward()
        opt.step()
        opt.zero_grad()
    params = dict(model.named_parameters())
    for name, value in out.items():
        if name in params:
            assert_step_close(value, params[name].detach(), name)
