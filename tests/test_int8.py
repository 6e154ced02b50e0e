"""Post-training int8 of the deploy form, in the runtimes benchmarks/int8.py measures: NNCF -> OpenVINO and ONNX
Runtime's ``quantize_static``. A small SMPConv with weights of a trained model's scale (random init gives logits of
about 1e-12, which no int8 scale can hold), calibrated on real images (scikit-learn's digits) and checked on others."""
import numpy as np
import pytest
import timm
import torch
from timm.utils import reparameterize_model

from client_libs import client

pytestmark = pytest.mark.clients

SMALL = dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), kernel_sizes=(13, 11, 9, 5), num_classes=10)


@pytest.fixture(scope='module')
def deploy_onnx(tmp_path_factory):
    client('onnx'), client('onnxscript')
    torch.manual_seed(0)
    model = timm.create_model('smpconv_t', **SMALL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight)
        for smp in model.smp_layers():
            smp.weights.normal_(0, 1. / smp.n_points ** 0.5)
    model.train()
    images = _digits(64)
    with torch.no_grad():
        for _ in range(3):  # BN statistics of real images
            model(torch.from_numpy(images))
    deploy = reparameterize_model(model.eval())
    path = str(tmp_path_factory.mktemp('int8') / 'small.onnx')
    torch.onnx.export(deploy, (torch.from_numpy(images[:2]),), path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim('batch')},), external_data=False)
    return deploy, path


def _digits(n, offset=0):
    from sklearn.datasets import load_digits
    images = load_digits().images[offset:offset + n] / 16.
    x = torch.nn.functional.interpolate(torch.from_numpy(images).float()[:, None], size=32, mode='bilinear')
    return ((x.repeat(1, 3, 1, 1) - 0.45) / 0.25).numpy()


def _check(int8_logits, fp32_logits):
    cos = (int8_logits * fp32_logits).sum(1) / np.linalg.norm(int8_logits, axis=1) / np.linalg.norm(fp32_logits, axis=1)
    # an untrained model's classes are close calls: the logit vectors are compared (a wrong scale anywhere in the
    # graph, e.g. on the large depthwise convs, leaves them unrelated), the classes loosely
    assert np.median(cos) > 0.98 and cos.min() > 0.8, (np.median(cos), cos.min())
    assert (int8_logits.argmax(1) == fp32_logits.argmax(1)).mean() >= 0.75


def _has_vnni() -> bool:
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith('flags')), '').split()
    except OSError:
        return True
    return any(f in flags for f in ('avx512_vnni', 'avx_vnni', 'amx_int8'))


def test_nncf_to_openvino(deploy_onnx):
    nncf, ov = client('nncf'), client('openvino')
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)
    deploy, path = deploy_onnx
    calib, test = _digits(64), _digits(64, offset=500)
    # the recipe of README's int8 paragraph: per-tensor activation scales, and without VNNI (AVX2-only CPUs, whose
    # int8 multiply-adds saturate at 16 bits) NNCF's overflow fix in every layer (7-bit weights)
    advanced = AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(per_channel=False))
    if not _has_vnni():
        advanced.overflow_fix = OverflowFix.ENABLE
    # ov.convert_model folds constants: read by Core().read_model, each depthwise conv's weights come through a
    # computed Reshape, NNCF scales them per channel and kernel column, and OpenVINO runs those convs in fp32
    model = ov.convert_model(path)
    quantized = nncf.quantize(model, nncf.Dataset([calib[i:i + 1] for i in range(64)]), subset_size=64,
                              advanced_parameters=advanced)
    depthwise = [op for op in quantized.get_ordered_ops() if op.get_type_name() == 'GroupConvolution']
    assert len(depthwise) >= 4
    for op in depthwise:  # int8 weights with one scale per output channel
        channels = op.input_value(1).get_partial_shape()[0].get_length()
        scale = op.input_value(1).get_node()
        assert scale.get_type_name() == 'Multiply', scale.get_type_name()
        assert tuple(scale.input_value(1).get_partial_shape().to_shape()) == (channels, 1, 1, 1, 1)
    compiled = ov.Core().compile_model(quantized, 'CPU', {'PERF_COUNT': True})
    request = compiled.create_infer_request()
    with torch.no_grad():
        _check(request.infer({0: test})[0], deploy(torch.from_numpy(test)).numpy())
    kernels = {p.exec_type for p in request.get_profiling_info() if p.node_type == 'GroupConvolution'}
    assert kernels and all(k.upper().endswith('I8') for k in kernels), kernels


@pytest.mark.parametrize('per_channel', [False, True])
def test_onnxruntime_quantize_static(deploy_onnx, tmp_path, per_channel):
    ort, onnx = client('onnxruntime'), client('onnx')
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    deploy, path = deploy_onnx
    calib, test = _digits(64), _digits(64, offset=500)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{'x': calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    out = str(tmp_path / 'int8.onnx')
    quantize_static(path, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    session = ort.InferenceSession(out, providers=['CPUExecutionProvider'])
    assert sum(n.op_type == 'DequantizeLinear' for n in onnx.load(out).graph.node) > 10
    with torch.no_grad():
        _check(session.run(None, {'x': test})[0], deploy(torch.from_numpy(test)).numpy())
