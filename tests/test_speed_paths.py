"""The speed paths give the right values: any input size in any order, NCHW input, bf16 / AMP, torch.compile."""
import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

from smpconv_timm import SMPConv2d
from smpconv_timm.config import set_dwconv_algorithms, set_eval_cache_mb, set_inference_fast_path, \
    set_training_recompute
from smpconv_timm.kernels import FusedConv, dwconv, fastpath
from smpconv_timm.kernels.runtime import onednn_bf16_available

from test_fastpath import plain as plain_modules, randomise_bn  # non-trivial BN statistics: folding is exercised

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5))


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomise_bn(timm.create_model('smpconv_t', **dict(TINY, **kwargs)))


def fused_convs(model):
    for m in model.modules():
        plan = m.__dict__.get('_fast_plan')
        if plan is not None:
            yield from (f for f in (plan[1] if isinstance(plan[1], tuple) else (plan[1],)) if isinstance(f, FusedConv))


def golden_model(release_checkpoint, variant):
    return timm.create_model(f'smpconv_{variant}', pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(release_checkpoint(variant)))).eval()


# ---------------------------------------------------------------------------------------------------------
# 1. any input size, in any order


@pytest.mark.parametrize('deploy', [False, True])
def test_input_sizes_in_any_order_equal_a_fresh_model(deploy):
    model = tiny().eval()
    if deploy:
        model = reparameterize_model(model)
    state = model.state_dict()
    x = {s: torch.randn(2, 3, s, s).contiguous(memory_format=torch.channels_last) for s in (160, 224)}
    with torch.no_grad():
        got = [(s, model(x[s])) for s in (160, 224, 160)]
        for s, out in got:
            fresh = copy.deepcopy(model)  # a copy carries no packed weights: it packs for its first size only
            fresh.load_state_dict(state)
            assert not any(f._packed for f in fused_convs(fresh))
            torch.testing.assert_close(out, fresh(x[s]), rtol=1e-5, atol=1e-5)


def older_plan_bytes(convs):
    """Bytes of the packed plans that are not their conv's most recent geometry."""
    return sum(p.nbytes() for f in convs for k, p in f._packed.items() if k != next(reversed(f._packed)))


def test_packed_weights_are_kept_per_geometry_within_the_budget(monkeypatch):
    model = tiny().eval()
    sizes = (64, 96, 48, 128, 80, 64, 112, 40, 144, 96)
    released = []
    monkeypatch.setattr(fastpath, 'release_free_memory', lambda: released.append(1))
    with torch.no_grad():
        with set_eval_cache_mb(1e6):  # room for all: every geometry kept, keyed by the exact geometry packed for
            for s in sizes:
                model(torch.randn(1, 3, s, s).contiguous(memory_format=torch.channels_last))
            convs = list(fused_convs(model))
            assert convs and max(len(f._packed) for f in convs) == len(set(sizes))  # (late stages: fewer map sizes)
            assert all(len(k[0]) == 4 for f in convs for k in f._packed)
        assert len(released) == len(set(sizes))  # freed memory returned after each forward that packed weights
        model(torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last))
        assert len(released) == len(set(sizes))  # nothing packed: nothing to release
        budget_mb = 0.02
        with set_eval_cache_mb(budget_mb):
            for s in sizes:
                model(torch.randn(2, 3, s, s).contiguous(memory_format=torch.channels_last))
                assert older_plan_bytes(convs) <= budget_mb * 2 ** 20
                assert all(next(reversed(f._packed))[0][0] == 2 for f in convs)  # the most recent geometry is kept
        with set_eval_cache_mb(0):
            model(torch.randn(1, 3, 72, 72).contiguous(memory_format=torch.channels_last))
            assert all(len(f._packed) == 1 for f in convs)


# ---------------------------------------------------------------------------------------------------------
# 2. NCHW input runs channels-last inside


def test_nchw_input_runs_channels_last_with_the_same_values():
    model = tiny().eval()
    seen = []
    model.stages[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 64, 64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            out_nchw = model(x)
            out_cl = model(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(out_nchw, out_cl, rtol=1e-5, atol=1e-5)
    assert seen == [True] * 4
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in feats)
    ref = model.forward_intermediates(x.contiguous(memory_format=torch.channels_last), intermediates_only=True)
    for a, b in zip(feats, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nchw_training_gradients_match_channels_last():
    model = tiny().train()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 48, 48)
    model(x).square().mean().backward()
    twin(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(), msg=name)


# ---------------------------------------------------------------------------------------------------------
# 3. bf16 inference


def bf16_logits(model, x, how):
    with torch.no_grad():
        if how == 'autocast':
            with torch.autocast('cpu', torch.bfloat16):
                out = model(x)
            assert out.dtype == torch.bfloat16  # as autocast gives it
        else:
            out = copy.deepcopy(model).to(torch.bfloat16)(x.to(torch.bfloat16))
    return out.double().numpy()


@pytest.mark.parametrize('variant', ['t', pytest.param('b', marks=pytest.mark.slow)])
def test_bf16_logits_match_the_golden_fp64_logits(release_checkpoint, golden, golden_input, variant):
    ref = golden[f'smpconv_{variant}_ema_logits_fp64']
    bound = 2e-2 * np.abs(ref).max()
    model = golden_model(release_checkpoint, variant)
    forms = {'train': model, 'deploy': reparameterize_model(model)}
    # reparameterized after the cast: folded in float32, rounded once to bf16
    forms['deploy after cast'] = reparameterize_model(copy.deepcopy(model).to(torch.bfloat16))
    for form, m in forms.items():
        for how in ('autocast', 'to(bf16)'):
            if form == 'deploy after cast' and how == 'autocast':
                continue
            err = np.abs(bf16_logits(m, golden_input, how) - ref).max()
            assert err < bound, (form, how, err / np.abs(ref).max())
    x = golden_input.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # and the float32 forms stay exact after bf16 use (plans built under autocast)
        err = (forms['train'](x) - forms['deploy'](x)).abs().max().item()
    assert err < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize('deploy', [False, True])
def test_autocast_takes_the_fast_path_with_autocast_semantics(deploy):
    model = tiny().eval()
    if deploy:
        model = reparameterize_model(model)
    x = torch.randn(2, 3, 64, 64)
    with set_inference_fast_path(False), torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        ref = model(x)
    assert not list(fused_convs(model))
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        out = model(x)
        block_out = model.stages[0].blocks[0](torch.randn(2, 16, 16, 16))  # a float32 input to one block
    convs = list(fused_convs(model))
    assert convs and all(torch.bfloat16 in f._cast or f.weight.dtype == torch.bfloat16 for f in convs)
    assert all(k[0][1] == torch.bfloat16 for f in convs for k in f._packed.items())  # the convs ran in bf16
    assert out.dtype == ref.dtype == torch.bfloat16
    assert block_out.dtype == torch.float32  # the residual add promotes, as it does in the plain block
    with torch.no_grad():
        exact = model(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=3e-2 * exact.abs().max().item())
    torch.testing.assert_close(out.float(), exact, rtol=0, atol=3e-2 * exact.abs().max().item())


# ---------------------------------------------------------------------------------------------------------
# 4. AMP training


@pytest.mark.parametrize('stage, algo', [(s, a) for s, algos in dwconv.ALGORITHMS.items() for a in algos])
def test_bf16_autocast_smp_layer_gradients_match_float32(stage, algo):
    with set_dwconv_algorithms(**{stage: algo}):
        torch.manual_seed(0)
        layer = SMPConv2d(8, 7, bias=True)
        x = torch.randn(2, 8, 12, 12, requires_grad=True)
        inputs = (x, *layer.parameters())
        out = layer(x)
        grad = torch.randn_like(out)
        ref = torch.autograd.grad(out, inputs, grad)
        with torch.autocast('cpu', torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.bfloat16
        got = torch.autograd.grad(out, inputs, grad.to(torch.bfloat16))
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0, atol=2e-2 * r.abs().max().item())


def test_bf16_autocast_train_step():
    """Ours under AMP (dwconv backward, radius hooks) against PyTorch's own modules and kernels under AMP,
    and the loss against float32."""
    model = tiny(drop_path_rate=0.).train()
    plain, fp32 = copy.deepcopy(model), copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64)
    y = torch.randint(0, 1000, (4,))
    with set_dwconv_algorithms(forward='direct', input_grad='direct', weight_grad='fft'):
        with torch.autocast('cpu', torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    # PyTorch's own kernels, in float32 and rounded where PyTorch has no oneDNN bf16 conv (AVX2-only CPUs): its CPU
    # fallback there accumulates the bf16 depthwise input gradient in bf16, ~2 % off (tests/test_dwconv.py)
    plain_algos = dict(forward='direct', input_grad='native', weight_grad='native') if onednn_bf16_available() else \
        dict(forward='direct_fp32', input_grad='native_fp32', weight_grad='native_fp32')
    with set_training_recompute(False), set_dwconv_algorithms(**plain_algos, pointwise='conv'):
        with torch.autocast('cpu', torch.bfloat16):
            loss_plain = F.cross_entropy(plain(x), y)
        loss_plain.backward()
    loss_fp32 = F.cross_entropy(fp32(x), y)
    torch.testing.assert_close(loss.float(), loss_fp32, rtol=1e-2, atol=0)
    torch.testing.assert_close(loss, loss_plain)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=2e-2 * q.grad.abs().max().item(), msg=name)
    layer = model.smp_layers()[0]
    with torch.no_grad():
        layer.radius.fill_(0.99)
        layer.radius.grad = -torch.ones_like(layer.radius)  # a step that pushes every radius far above the maximum
    torch.optim.SGD(model.parameters(), lr=1e4).step()
    assert layer.radius.max().item() == 1.


# ---------------------------------------------------------------------------------------------------------
# 5. torch.compile


@pytest.mark.slow
def test_compiled_train_step_equals_eager():
    # float64, and 4 images at 64 px so that the last stage's BatchNorms see 16 values per channel: with 2 images
    # at 32 px (1x1 maps) they normalise 2 values and amplify any float difference in the gradients ~1e4-fold.
    # (Inductor computes the kernel grid, a float32 linspace cast to float64, in float64 directly: ~1e-7 apart.)
    model = tiny(depths=(1, 1, 1, 1)).double().train()
    twin = copy.deepcopy(model)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    y = torch.randint(0, 1000, (4,))
    compiled = torch.compile(model)
    loss = F.cross_entropy(compiled(x), y)
    loss.backward()
    ref = F.cross_entropy(twin(x), y)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-8)
    scale = max(q.grad.abs().max().item() for q in twin.parameters())  # some true gradients are ~0 (BN-cancelled)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):  # running statistics
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


class GraphRecorder:
    """A torch.compile backend that keeps each graph's call targets and runs the graph as traced."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(n.target) for n in gm.graph.nodes if n.op == 'call_function'])
        return gm.forward

    def targets(self):
        return [t for g in self.graphs for t in g]


@pytest.mark.skipif(not hasattr(torch.compiler, 'is_exporting'),
                    reason='PyTorch < 2.5 cannot tell torch.export from torch.compile: compiled graphs hold plain ops')
@pytest.mark.parametrize('deploy', [False, True])
def test_compiled_eval_is_the_fast_path_as_one_op(deploy):
    # Inductor's graph of the plain modules runs each conv unfused with its weights re-blocked on every call, slower
    # than eager; the compiled eval forward holds the eager fast path as one op, valid at any size (fullgraph)
    model = tiny().eval()
    if deploy:
        model = reparameterize_model(model)
    recorder = GraphRecorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    for size in (64, 37, 32):  # NCHW, an odd size, 1x1 features: the op's output shape is worked out while tracing
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), plain_modules(model, x), rtol=1e-4, atol=1e-5)
    targets = recorder.targets()
    assert targets.count('smpconv_timm.eval_features.default') == len(recorder.graphs) >= 1
    assert not [t for t in targets if 'conv' in t.replace('smpconv_timm', '')]  # every conv inside; the head compiled


@pytest.mark.slow  # three torch.compile runs: 23 s on 2 cores of an AVX2-only CPU
def test_compiled_graphs_record_the_plain_modules_where_the_fast_path_does_not_run():
    model = tiny().eval()
    x = torch.randn(2, 3, 48, 48)
    for name, context in (('autograd on', torch.enable_grad), ('bf16 autocast', lambda: torch.autocast('cpu')),
                          ('fast path off', lambda: set_inference_fast_path(False))):
        recorder = GraphRecorder()
        with context():
            torch.compile(model, backend=recorder)(x)
        targets = recorder.targets()
        assert 'smpconv_timm.eval_features.default' not in targets and any('conv2d' in t for t in targets), name
    exported = torch.export.export(model, (x,))  # exported programs hold plain ops, for every runtime
    graph = str(exported.graph)
    assert 'eval_features' not in graph and 'conv2d' in graph


def test_one_compiled_function_serves_two_models_with_their_own_weights():
    # a graph traced for one model and reused for another of the same structure runs the other's weights
    models = [tiny(seed).eval() for seed in (0, 1)]
    fn = torch.compile(lambda m, x: m(x), backend='eager')
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for m in models + models[::-1]:
            torch.testing.assert_close(fn(m, x), plain_modules(m, x), rtol=1e-4, atol=1e-5)
