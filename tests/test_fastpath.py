"""The inference fast path and the training recomputation give what the plain modules give."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import reparameterize_model

import smpconv_timm.smpconv as smpconv_module
from smpconv_timm.config import set_dwconv_algorithms, set_inference_fast_path, set_training_recompute
from smpconv_timm.kernels import FusedConv, act_name, dwconv
from smpconv_timm.smpconv import ConvFfnBlock, SmpBlock

TINY = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 40), kernel_sizes=(9, 7, 7, 5))


def randomise_bn(model):
    """Non-trivial BatchNorm statistics, so that folding them is really exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
    return model


def plain(model, x):
    """The plain modules: autograd on takes them (the fast path is for no-grad inference)."""
    with torch.enable_grad():
        return model(x).detach()


def fast(model, x):
    with torch.no_grad():
        return model(x)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1., b.abs().max().item()))


@pytest.mark.parametrize('channels_last', [True, False])
@pytest.mark.parametrize('size', [64, 20])  # 20: stage-3/4 maps smaller than the kernels (cropped taps)
def test_train_form_eval_matches_plain_modules(release_checkpoint, channels_last, size):
    model = timm.create_model('smpconv_t', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(release_checkpoint('t')))).eval()
    x = torch.randn(2, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = fast(model, x)
    assert '_fast_plan' in model.stages[0].blocks[0].__dict__  # really the fast path
    close(out, plain(model, x))


def test_deploy_form_matches_plain_modules():
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    deploy = reparameterize_model(model)
    x = torch.randn(2, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    close(fast(deploy, x), plain(deploy, x))
    close(fast(deploy, x), plain(model, x))


def test_plan_follows_parameter_changes():
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    x = torch.randn(1, 3, 32, 32)
    fast(model, x)
    block = model.stages[1].blocks[0]
    plan = block.__dict__['_fast_plan']
    fast(model, x)
    assert block.__dict__['_fast_plan'] is plan  # reused while nothing changes
    with torch.no_grad():  # an in-place update, as an optimizer or an EMA makes
        block.large_kernel.smp.conv.radius.mul_(0.8)
        model.stages[2].blocks[1].pw1.bn.running_var.mul_(1.5)
    close(fast(model, x), plain(model, x))
    other = randomise_bn(timm.create_model('smpconv_t', **TINY))
    model.load_state_dict(other.state_dict())
    close(fast(model, x), plain(other.eval(), x))
    # a replaced submodule and a replaced parameter, as surgery or a hand-made fine-tune makes
    pw1 = model.stages[2].blocks[1].pw1
    pw1.bn = randomise_bn(nn.BatchNorm2d(pw1.bn.num_features)).eval()
    block.large_kernel.smp.conv.weight_coord = nn.Parameter(block.large_kernel.smp.conv.weight_coord * 0.9)
    close(fast(model, x), plain(model, x))
    model.train()
    assert '_fast_plan' not in block.__dict__  # training drops the cached weights


def test_blocks_trust_the_model_state_check(monkeypatch):
    """In a model forward the blocks take the model's own state check: with nothing changed, one walk over the
    model's tensors per forward; a block changed and then run on its own, or the model run again, still follows."""
    from smpconv_timm.kernels import fastpath
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    x = torch.randn(1, 3, 32, 32)
    fast(model, x)
    walks = []
    real = fastpath._version_key
    monkeypatch.setattr(fastpath, '_version_key', lambda m: walks.append(m) or real(m))
    fast(model, x)
    assert walks == [model]
    block = model.stages[1].blocks[0]
    block_in = torch.randn(1, 24, 8, 8)
    with torch.no_grad():
        block.large_kernel.smp.conv.radius.mul_(0.8)
    close(fast(block, block_in), plain(block, block_in))  # on its own: its own check
    with torch.no_grad():
        block.large_kernel.smp.conv.weight_coord.mul_(0.9)
    close(fast(model, x), plain(model, x))  # the model's check sees the change
    walks.clear()
    fast(model, x)
    assert walks == [model]


def test_fast_path_only_where_it_applies():
    model = timm.create_model('smpconv_t', **TINY)
    block = model.stages[0].blocks[0]
    x = torch.randn(2, 3, 64, 64)
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)  # autograd on
    with set_inference_fast_path(False), torch.no_grad():
        model(x)
    assert '_fast_plan' not in block.__dict__
    with torch.no_grad():
        model(x)
    assert '_fast_plan' in block.__dict__


def conv_outputs_per_part(model, x):
    """The largest conv output per image of each part (stem, stages), recorded from the plain modules' forward."""
    largest, hooks = [], []
    for i, part in enumerate((model.stem, *model.stages)):
        largest.append(0)
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_hook(
                    lambda mod, args, out, i=i: largest.__setitem__(i, max(largest[i], out[0].numel()))))
    plain(model, x)
    for h in hooks:
        h.remove()
    return largest


@pytest.mark.parametrize('size', [(64, 64), (40, 56)])
def test_activation_sizes_are_those_the_plain_forward_makes(size):
    model = timm.create_model('smpconv_t', **TINY).eval()
    x = torch.randn(1, 3, *size)
    assert model._largest_activations(*size) == conv_outputs_per_part(model, x)
    assert model._largest_activations(*size) == conv_outputs_per_part(reparameterize_model(model), x)


@pytest.mark.parametrize('batch', [6, 5])
@pytest.mark.parametrize('bf16', [False, True])
def test_a_large_batch_runs_its_first_parts_in_slices(monkeypatch, batch, bf16):
    """Where an activation of the stem or stage 1 would pass SPLIT_BYTES, they run on slices of the batch, and the
    logits are those of the plain modules on the whole batch."""
    from smpconv_timm.kernels import fastpath
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    x = torch.randn(batch, 3, 64, 64)
    # per image, elements: stem 16 x 32 x 32; the FFNs' hidden tensors, stage 1 64 x 16 x 16, stage 2 96 x 8 x 8,
    # stage 3 128 x 4 x 4; with room for two stem outputs a batch of 6 slices stem and stages 1-2, one of 5 stem and
    # stage 1 (5 x 6144 elements fit 2 x 16384)
    assert model._largest_activations(64, 64)[:4] == [16384, 16384, 6144, 2048]
    monkeypatch.setattr(fastpath, 'SPLIT_BYTES', 2 * 16384 * (2 if bf16 else 4))
    stem_calls, stage_batches = [], []
    model.stem.register_forward_hook(lambda m, args, out: stem_calls.append(args[0].shape[0]))
    for stage in model.stages:
        stage.register_forward_hook(lambda m, args, out: stage_batches.append(args[0].shape[0]))
    with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
        out = fast(model, x)
        if batch == 6:
            assert stem_calls == [2, 2, 2] and stage_batches == [2, 2, 2, 2, 2, 2, 6, 6]
        else:
            assert stem_calls == [2, 2, 1] and stage_batches == [2, 2, 1, 5, 5, 5]
        stem_calls.clear()
        ref = plain(model, x)
    if bf16:
        torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05 * ref.abs().max().item())
    else:
        close(out, ref)
    assert stem_calls == [batch]  # autograd on: the plain modules, whole batch


def test_batch_split_only_in_cpu_eval_inference():
    from smpconv_timm.kernels import batch_split
    model = timm.create_model('smpconv_t', **TINY).eval()
    x = torch.randn(4, 3, 64, 64)
    huge = [10 ** 9] * 5
    with torch.no_grad():
        assert batch_split(model, x, huge) == (5, 4)  # a slice per image, nothing smaller
        assert batch_split(model, x[:1], huge) == (5, 1)
        assert batch_split(model, x, [0] * 5) == (0, 1)
        with set_inference_fast_path(False):
            assert batch_split(model, x, huge) == (0, 1)
    assert batch_split(model, x, huge) == (0, 1)  # autograd on
    model.train()
    with torch.no_grad():
        assert batch_split(model, x, huge) == (0, 1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('op', ['relu', 'gelu', 'none', 'residual', 'depthwise_relu'])
def test_fused_ops_keep_nan_and_inf_as_pytorch_does(op, dtype):
    torch.manual_seed(0)
    c, depthwise = 8, op == 'depthwise_relu'
    k, groups = (7, c) if depthwise else (1, 1)
    act = {'relu': 'relu', 'depthwise_relu': 'relu', 'gelu': 'gelu'}.get(op, 'none')
    weight, bias = torch.randn(c, c // groups, k, k, dtype=dtype), torch.randn(c, dtype=dtype)
    x = torch.randn(2, c, 12, 12, dtype=dtype)
    x[0, :, 2, 3] = float('nan')
    x[0, 1, 7, 7] = float('inf')  # one channel: +-inf conv outputs, as well as NaN (inf - inf) in depthwise sums
    x[0, 5, 10, 2] = -float('inf')
    x[1, 4, 9, 9] = 1e30
    residual = None
    if op == 'residual':
        residual = torch.randn_like(x)
        residual[1, :, 5, 5] = float('nan')
        residual[1, 3, 0, 0], residual[1, 6, 11, 11] = float('inf'), -float('inf')
        residual = residual.contiguous(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv = FusedConv(weight, bias, padding=k // 2, groups=groups, act=act)
        out = conv(x, residual)
        # the finite image's result is bitwise what it is in a batch without the NaN and inf, as in PyTorch's conv
        others = conv(torch.cat([torch.randn_like(x[:1]), x[1:]]).contiguous(memory_format=torch.channels_last),
                      residual)
        torch.testing.assert_close(out[1], others[1], rtol=0, atol=0, equal_nan=True)
        ref = F.conv2d(x, weight, bias, 1, k // 2, 1, groups)
        ref = {'relu': F.relu, 'gelu': F.gelu, 'none': lambda t: t}[act](ref)
        ref = ref if residual is None else ref + residual
    finite, nan = ref.isfinite(), ref.isnan()
    assert nan.any() and not finite.all()
    assert torch.equal(out.isfinite(), finite)
    assert out[nan].isnan().all()
    if act != 'gelu':  # PyTorch's own gelu(+-inf) is inf or NaN, depending on where the element falls (vector or tail)
        assert torch.equal(out.isnan(), nan) and torch.equal(out[ref.isinf()], ref[ref.isinf()])
    for i in range(len(x)):  # each image to its own scale (the FFT's rounding is relative to the map's largest value)
        got, want = out[i][finite[i]].float(), ref[i][finite[i]].float()
        if dtype == torch.float32:
            close(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2 * max(1., want.abs().max().item()))


CONTEXTS = {
    'inference_mode': torch.inference_mode,
    'no_grad': torch.no_grad,
    'input_grad': torch.enable_grad,  # a frozen model, autograd on for the input (saliency, adversarial examples)
    'autocast_bf16': lambda: torch.autocast('cpu', torch.bfloat16),
}


@pytest.mark.parametrize('fast_path', [True, False])
def test_caches_made_in_one_context_serve_every_other(fast_path):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval().requires_grad_(False)
    pristine = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)

    def run(m, context):
        xi = x.clone().requires_grad_(context == 'input_grad')
        with set_inference_fast_path(fast_path), CONTEXTS[context]():
            out = m(xi)
        if context == 'input_grad':
            out.logsumexp(1).sum().backward()
            return out.detach(), xi.grad
        return out, None

    refs = {context: run(copy.deepcopy(pristine), context) for context in CONTEXTS}  # no cache from another context
    others = [c for c in CONTEXTS if c != 'inference_mode']
    for first, then in [('inference_mode', c) for c in others] + [(c, 'inference_mode') for c in others]:
        model.train().eval()  # drops every cache
        run(model, first)  # caches made in `first`, used in `then`
        out, grad = run(model, then)
        torch.testing.assert_close(out, refs[then][0], rtol=0, atol=0, msg=(first, then))
        if grad is not None:
            torch.testing.assert_close(grad, refs[then][1], rtol=0, atol=0, msg=(first, then))


def test_a_model_made_under_inference_mode_runs_where_timm_models_do():
    torch.manual_seed(0)
    twin = randomise_bn(timm.create_model('smpconv_t', **TINY)).eval()
    with torch.inference_mode():  # every parameter an inference tensor: no version counter to key caches on
        model = timm.create_model('smpconv_t', **TINY).eval()
        model.load_state_dict(twin.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for context in (torch.inference_mode, torch.no_grad):
        for fast_path in (True, False):
            with set_inference_fast_path(fast_path), context():
                torch.testing.assert_close(model(x), twin(x))
                with torch.inference_mode():  # an in-place change there has no version either: never served stale
                    model.stages[1].blocks[0].large_kernel.smp.conv.radius.mul_(0.9)
                    twin.stages[1].blocks[0].large_kernel.smp.conv.radius.mul_(0.9)
                torch.testing.assert_close(model(x), twin(x))


def test_fused_activation_names():
    assert act_name(nn.ReLU()) == 'relu' and act_name(nn.GELU()) == 'gelu'
    with pytest.raises(ValueError, match='no fused form'):
        act_name(nn.GELU(approximate='tanh'))


def test_training_recomputation_matches_plain_autograd(monkeypatch):
    torch.manual_seed(0)
    model = randomise_bn(timm.create_model('smpconv_t', **TINY)).train()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 48, 48).contiguous(memory_format=torch.channels_last)
    calls = []
    original = smpconv_module.bn_gelu_conv
    monkeypatch.setattr(smpconv_module, 'bn_gelu_conv', lambda *a: calls.append(1) or original(*a))
    out = model(x)
    out.square().mean().backward()
    assert len(calls) == sum(isinstance(m, ConvFfnBlock) for m in model.modules())
    with set_training_recompute(False):
        out_ref = ref(x)
        out_ref.square().mean().backward()
    assert len(calls) == 5
    torch.testing.assert_close(out, out_ref)
    scale = max(p.grad.abs().max() for p in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5 * scale, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=name)  # running statistics and num_batches_tracked


def test_sync_batchnorm_takes_the_plain_modules(monkeypatch):
    model = timm.create_model('smpconv_t', **TINY).train()
    ffn = model.stages[0].blocks[1]
    ffn.pw1.bn = nn.SyncBatchNorm(ffn.pw1.bn.num_features)
    monkeypatch.setattr(smpconv_module, 'bn_gelu_conv', lambda *a: pytest.fail('recomputed a SyncBatchNorm'))
    ffn(torch.randn(2, 16, 8, 8)).sum()  # SyncBatchNorm falls back to plain BN without a process group


def test_smp_blocks_keep_their_plain_forward_in_training():
    block = SmpBlock(8, 7).train()
    x = torch.randn(2, 8, 10, 10, requires_grad=True)
    block(x).sum().backward()
    assert x.grad is not None and block.large_kernel.smp.conv.radius.grad is not None


@pytest.mark.slow  # a fresh interpreter with oneDNN held to AVX2: ~15 s
def test_bf16_on_cpus_without_onednn_bf16_runs_as_plain_conv2d():
    """Below AVX512-BF16 (here: oneDNN held to AVX2, as on AVX2-only CPUs) PyTorch has no oneDNN bf16 conv; the fast
    path then runs bf16 as plain conv2d instead of failing to pack its weights."""
    code = '''
import timm, torch
from smpconv_timm.config import set_inference_fast_path
assert not torch.ops.mkldnn._is_mkldnn_bf16_supported()
torch.manual_seed(0)
model = timm.create_model('smpconv_t', depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), kernel_sizes=(7, 7, 5, 5)).eval()
x = torch.randn(2, 3, 32, 32)
with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
    fast = model(x).float()
    with set_inference_fast_path(False):
        plain = model(x).float()
err = ((fast - plain).abs().max() / plain.abs().max()).item()
assert err < 2e-2, err
print('ok', err)
'''
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA='AVX2')
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith('ok'), proc.stderr[-3000:]


@pytest.mark.parametrize('algo', ['toeplitz', 'fft'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_the_matrix_form_and_fft_keep_nan_and_inf_as_pytorch_does(dtype, algo):
    """Forced (not timed), so that this does not depend on which candidate wins on the machine."""
    with set_dwconv_algorithms(forward=algo, input_grad=algo, weight_grad=algo):
        test_fused_ops_keep_nan_and_inf_as_pytorch_does('depthwise_relu', dtype)


@pytest.mark.parametrize('algo', sorted({v.partition(':')[0] for v in dwconv.candidates('forward', torch.float32)}))
def test_each_large_kernel_plan_equals_conv2d_in_float64(algo):
    """The fused eval conv with each forward algorithm forced: bias, ReLU or residual add, odd and even kernels,
    maps smaller than the kernel, any padding; channels-last in and out, as the model runs."""
    for n, c, h, w, k, p in [(2, 3, 11, 9, 5, 2), (2, 4, 7, 7, 13, 6), (2, 3, 10, 10, 6, 3), (2, 3, 8, 7, 5, 4),
                             (1, 5, 20, 16, 31, 15)]:
        torch.manual_seed(0)
        x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
        weight, bias = torch.randn(c, 1, k, k), torch.randn(c)
        ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, p, 1, c)
        residual = torch.randn(ref.shape).contiguous(memory_format=torch.channels_last)
        with set_dwconv_algorithms(forward=algo), torch.no_grad():
            for act, res, want in [('relu', None, ref.relu()), ('none', residual, ref + residual.double())]:
                conv = FusedConv(weight, bias, padding=p, groups=c, act=act)
                out = conv(x, res)
                assert [plan.algo.partition(':')[0] for plan in conv._packed.values()] == [algo]
                torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5 * want.abs().max().item(),
                                           msg=lambda m: f'{algo} {act} {(n, c, h, w, k, p)}: {m}')
                assert out.is_contiguous(memory_format=torch.channels_last)
