"""int8 for CPU serving: the deploy form quantized post-training, in OpenVINO (NNCF) and ONNX Runtime
(``quantize_static``), ConvNeXt treated the same way: top-1 of fp32 vs int8 on models trained on real images, and the
int8 speed ratio to ConvNeXt-T int8 in the same runtime.

    pip install -e ".[deploy]" nncf                              # onnx, onnxscript, onnxruntime, openvino; NNCF
    python benchmarks/digits.py prepare --out /tmp/digits        # then the two digits runs of benchmarks/README.md:
    python benchmarks/digits.py train --train-py $T --data-dir /tmp/digits --experiment smpconv_small --model smpconv_t \\
        --model-kwargs 'depths=(1,1,2,1)' 'dims=(32,64,128,256)' 'kernel_sizes=(13,13,11,5)'
    python benchmarks/digits.py train --train-py $T --data-dir /tmp/digits --experiment convnext_atto --model convnext_atto
    python benchmarks/int8.py --runs /tmp/digits_runs --data-dir /tmp/digits

Accuracy: each run's ``model_best.pth.tar`` (EMA weights; timm's train.py with ``benchmarks/digits_train.yaml``), in
deploy form (``reparameterize_model``; ConvNeXt as it is), exported to ONNX at 32x32 and scored on the 360 held-out
images in fp32 and int8; int8 calibrated on ``--calibration`` training images, never on held-out ones. ONNX Runtime
runs per-tensor and per-channel weight scales (QDQ, uint8 activations, int8 weights); NNCF its defaults (per-channel
symmetric weights). Speed: smpconv_t (deploy form, the golden weights) and convnext_tiny at 224x224, each quantized
the same way (calibrated on digits upsampled to 224), alternated in the same runtime, bs 1 and 16. OpenVINO runs
what is not int8 in fp32 (``--openvino-precision``: bf16, or its own default).
"""
import argparse
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from common import golden_model, interleaved, machine_line, ratio_cell, table  # benchmarks/common.py, beside this file
from deploy_runtimes import export, onnxruntime_session, openvino_profile, openvino_session

#: (model, digits run, model kwargs): the two models of benchmarks/README.md's digits runs
TRAINED = [
    ('smpconv_t', 'smpconv_small', dict(depths=(1, 1, 2, 1), dims=(32, 64, 128, 256), kernel_sizes=(13, 13, 11, 5))),
    ('convnext_atto', 'convnext_atto', {}),
]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_split(data_dir: str, split: str, size: int, limit: Optional[int] = None):
    """(images float32 N x 3 x size x size, labels): the ImageFolder split through the digits recipe's eval
    transform (bilinear resize, crop 1.0, ImageNet mean / std)."""
    from timm.data import create_dataset, create_transform
    transform = create_transform((3, size, size), crop_pct=1.0, interpolation='bilinear', mean=MEAN, std=STD)
    dataset = create_dataset('', root=os.path.join(data_dir, split), transform=transform)
    order = np.random.default_rng(0).permutation(len(dataset))[:limit] if limit else range(len(dataset))
    items = [dataset[int(i)] for i in order]
    return torch.stack([x for x, _ in items]).numpy(), np.array([y for _, y in items])


def trained_deploy(name: str, run_dir: str, kwargs: dict) -> torch.nn.Module:
    import timm
    from timm.models import load_checkpoint
    from timm.utils import reparameterize_model
    model = timm.create_model(name, num_classes=10, **kwargs)
    load_checkpoint(model, os.path.join(run_dir, 'model_best.pth.tar'), use_ema=True)
    return reparameterize_model(model.eval())


def quantize_onnxruntime(path: str, out: str, calibration: np.ndarray, per_channel: bool) -> str:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{'x': calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    prepared = out.replace('.onnx', '.pre.onnx')
    quant_pre_process(path, prepared)
    quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def quantize_openvino(path: str, out: str, calibration: np.ndarray, overflow_fix: bool = False,
                      per_tensor_activations: bool = True, fold: bool = True) -> str:
    """NNCF with per-tensor activation scales (``per_tensor_activations``; NNCF's default scales the depthwise convs'
    inputs per channel, and with those OpenVINO's int8 kernels gave wrong logits on the trained small SMPConv), and
    with its overflow fix in every layer (``overflow_fix``): 7-bit weights, so that CPUs without VNNI (AVX2-only),
    whose int8 multiply-adds saturate at 16 bits, give what VNNI CPUs give.

    ``fold``: read the file with ``ov.convert_model``, which folds constants, instead of ``Core().read_model``.
    ``read_model`` gives each depthwise conv its weights through a Reshape to a shape computed at run time; NNCF
    then scales those weights per channel *and* kernel column, which no int8 kernel takes, and OpenVINO runs every
    depthwise conv in fp32. Folded, the weights are one constant with per-channel scales, and the depthwise convs
    run in int8."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters, OverflowFix,
                                                       QuantizationParameters)
    model = ov.convert_model(path) if fold else ov.Core().read_model(path)
    dataset = nncf.Dataset([calibration[i:i + 1] for i in range(len(calibration))])
    advanced = AdvancedQuantizationParameters()
    if overflow_fix:
        advanced.overflow_fix = OverflowFix.ENABLE
    if per_tensor_activations:
        advanced.activations_quantization_params = QuantizationParameters(per_channel=False)
    ov.save_model(nncf.quantize(model, dataset, subset_size=len(calibration), advanced_parameters=advanced), out)
    return out


#: (runtime, int8 scheme) -> (quantize(path, out, calibration), session(path))
SCHEMES = {
    ('OpenVINO', 'NNCF, per-tensor activations'): (quantize_openvino, openvino_session, '.xml'),
    ('OpenVINO', 'NNCF, per-tensor act., overflow fix'): (lambda p, o, c: quantize_openvino(p, o, c, True),
                                                          openvino_session, '.xml'),
    ('OpenVINO', 'NNCF defaults'): (lambda p, o, c: quantize_openvino(p, o, c, per_tensor_activations=False),
                                    openvino_session, '.xml'),
    ('OpenVINO', 'NNCF defaults, read_model'): (
        lambda p, o, c: quantize_openvino(p, o, c, per_tensor_activations=False, fold=False), openvino_session, '.xml'),
    ('ONNX Runtime', 'per-tensor'): (lambda p, o, c: quantize_onnxruntime(p, o, c, False), onnxruntime_session, '.onnx'),
    ('ONNX Runtime', 'per-channel'): (lambda p, o, c: quantize_onnxruntime(p, o, c, True), onnxruntime_session, '.onnx'),
}
FP32 = {'OpenVINO': openvino_session, 'ONNX Runtime': onnxruntime_session}


def slug(runtime: str, scheme: str) -> str:
    return '_'.join(''.join(c if c.isalnum() else ' ' for c in f'{runtime} {scheme}').split())


def predict(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int = 1) -> np.ndarray:
    return np.concatenate([run(images[i:i + batch]).argmax(-1) for i in range(0, len(images), batch)])


def percent(mask: np.ndarray) -> float:
    return 100. * float(mask.mean())


def accuracy_rows(args, tmp: str) -> List[List[str]]:
    val, val_labels = load_split(args.data_dir, 'val', 32)
    calib, _ = load_split(args.data_dir, 'train', 32, args.calibration)
    rows = [['model (digits run)', 'runtime', 'int8 weights', 'fp32 top-1', 'int8 top-1', 'int8 - fp32',
             'int8 class = fp32 class']]
    for name, run, kwargs in TRAINED:
        model = trained_deploy(name, os.path.join(args.runs, run), kwargs)
        path = export(model, os.path.join(tmp, f'{run}.onnx'), size=32)
        with torch.no_grad():
            torch_top1 = percent(predict(lambda x: model(torch.from_numpy(x)).numpy(), val, 64) == val_labels)
        print(f'  {name}: PyTorch fp32 top-1 {torch_top1:.2f}', file=sys.stderr, flush=True)
        for (runtime, scheme), (quantize, session, ext) in SCHEMES.items():
            if runtime not in args.runtimes:
                continue
            fp32 = predict(FP32[runtime](path), val)
            int8 = predict(session(quantize(path, os.path.join(tmp, f'{run}_{slug(runtime, scheme)}{ext}'), calib)),
                           val)
            a, b = percent(fp32 == val_labels), percent(int8 == val_labels)
            rows.append([f'{name} ({run})', runtime, scheme, f'{a:.2f}', f'{b:.2f}', f'{b - a:+.2f}',
                         f'{percent(int8 == fp32):.2f} %'])
            print(f'  {name} {runtime} {scheme}: {a:.2f} -> {b:.2f}', file=sys.stderr, flush=True)
    return rows


def speed_rows(args, tmp: str) -> List[List[str]]:
    import timm
    from timm.utils import reparameterize_model
    model, _, _ = golden_model('t')
    files = {'ours': export(reparameterize_model(model), os.path.join(tmp, 'smpconv_t.onnx')),
             'baseline': export(timm.create_model('convnext_tiny').eval(), os.path.join(tmp, 'convnext_tiny.onnx'))}
    calib, _ = load_split(args.data_dir, 'train', 224, args.calibration_224)
    rows = [['runtime', 'int8 weights', 'batch', 'smpconv_t int8 ms', 'convnext_tiny int8 ms', 'ratio (min-max)']]
    for (runtime, scheme), (quantize, session, ext) in SCHEMES.items():
        if runtime not in args.runtimes or scheme not in args.speed_schemes:
            continue
        quantized = {k: quantize(p, p.replace('.onnx', f'_{slug(runtime, scheme)}_int8{ext}'), calib)
                     for k, p in files.items()}
        if args.profile and runtime == 'OpenVINO':
            x = np.random.default_rng(0).standard_normal((args.batches[0], 3, 224, 224), dtype=np.float32)
            times = {k: openvino_profile(p, x, args.reps, precision=True) for k, p in quantized.items()}
            kinds = sorted(set(times['ours']) | set(times['baseline']), key=lambda k: -sum(t.get(k, 0) for t in times.values()))
            prof = [['op, kernel precision', 'smpconv_t ms', 'convnext_tiny ms']] + [
                [k] + [f'{times[m][k]:.1f}' if k in times[m] else '-' for m in ('ours', 'baseline')]
                for k in kinds if sum(t.get(k, 0) for t in times.values()) >= 0.05 * len(x)]
            prof.append(['all nodes'] + [f'{sum(times[m].values()):.1f}' for m in ('ours', 'baseline')])
            print(f'OpenVINO int8 ({scheme}), bs {len(x)}\n\n' + table(prof) + '\n', flush=True)
        if runtime == 'OpenVINO':
            runs = {k: openvino_session(p, None if args.openvino_precision == 'default' else args.openvino_precision)
                    for k, p in quantized.items()}
        else:
            runs = {k: session(p) for k, p in quantized.items()}
        for bs in args.batches:
            x = np.random.default_rng(0).standard_normal((bs, 3, 224, 224), dtype=np.float32)
            reps = args.reps if bs <= 8 else max(3, args.reps // 2)
            a, b, r, lo, hi = interleaved(lambda: runs['ours'](x), lambda: runs['baseline'](x), 'cpu', reps)
            rows.append([runtime, scheme, str(bs), f'{a:.1f}', f'{b:.1f}', ratio_cell(r, lo, hi)])
            print(f'  {runtime} {scheme} bs {bs}: {r:.2f}x', file=sys.stderr, flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', default='/tmp/digits_runs', help="benchmarks/digits.py train's --output")
    parser.add_argument('--data-dir', default='/tmp/digits', help="benchmarks/digits.py prepare's --out")
    parser.add_argument('--calibration', type=int, default=300, help='training images that calibrate at 32x32')
    parser.add_argument('--calibration-224', type=int, default=64, help='... and at 224x224 (speed rows)')
    parser.add_argument('--runtimes', nargs='+', default=['OpenVINO', 'ONNX Runtime'], choices=list(FP32))
    parser.add_argument('--speed-schemes', nargs='+', default=['NNCF, per-tensor activations', 'per-channel'])
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--reps', type=int, default=10, help='alternations per speed row (bs 16: half)')
    parser.add_argument('--profile', action='store_true',
                        help="also OpenVINO's per-node int8 times by kind of op and kernel precision, at the first batch")
    parser.add_argument('--openvino-precision', default='f32', choices=['f32', 'bf16', 'default'],
                        help="speed rows: OpenVINO's precision for what is not int8 (its default: bf16 where the CPU has it)")
    parser.add_argument('--skip-speed', action='store_true')
    parser.add_argument('--skip-accuracy', action='store_true')
    args = parser.parse_args(argv)
    print(machine_line() + '\n', flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_accuracy:
            print(table(accuracy_rows(args, tmp)) + '\n', flush=True)
        if not args.skip_speed:
            print(table(speed_rows(args, tmp)), flush=True)


if __name__ == '__main__':
    main()
