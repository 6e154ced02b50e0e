"""The deploy form outside PyTorch: exported to ONNX, checked, and timed in ONNX Runtime and OpenVINO against
ConvNeXt exported and run the same way.

    pip install -e ".[deploy]"                                   # onnx, onnxscript, onnxruntime, openvino
    python benchmarks/deploy_runtimes.py                         # smpconv_t vs convnext_tiny, bs 1 and 16
    python benchmarks/deploy_runtimes.py --large-kernel toeplitz # the large kernels exported as matrix products

Both models are exported with ``torch.onnx.export(..., dynamo=True)`` (dynamic batch, 224x224). SMPConv is the
deploy form (``timm.utils.reparameterize_model``) of the golden weights; its fp32 logits in each runtime are checked
against PyTorch's on the golden images (bound: 1e-4 x max |logit|) before anything is timed. ``--large-kernel``
picks how the large depthwise convs are exported: ``direct`` (one depthwise ``Conv`` node each) or ``toeplitz``
(``smpconv_timm.config.set_dwconv_algorithms(forward='toeplitz')``: each kernel row a banded matrix, one grouped
``Conv`` over the image rows, valid at the exported width), ``both`` for a row each. The runtimes run fp32 (OpenVINO's
``INFERENCE_PRECISION_HINT`` set to f32: on CPUs with AMX it would otherwise pick bf16) with the thread count of
this process; each row alternates ours and ConvNeXt.
"""
import argparse
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from common import golden_model, interleaved, machine_line, ratio_cell, table  # benchmarks/common.py, beside this file

BASELINES = {'t': 'convnext_tiny', 'b': 'convnext_base'}


def export(model: torch.nn.Module, path: str, large_kernel: str = 'direct') -> str:
    from smpconv_timm import config
    x = torch.randn(2, 3, 224, 224)
    batch = torch.export.Dim('batch', min=1, max=1024)
    algo = 'toeplitz' if large_kernel == 'toeplitz' else 'auto'
    with config.set_dwconv_algorithms(forward=algo), torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    return path


def onnxruntime_session(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_session(path: str) -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov
    core = ov.Core()
    compiled = core.compile_model(path, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32',
                                                'INFERENCE_NUM_THREADS': torch.get_num_threads()})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0]


RUNTIMES = {'ONNX Runtime': onnxruntime_session, 'OpenVINO': openvino_session}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='t', choices=list(BASELINES))
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--large-kernel', default='both', choices=['direct', 'toeplitz', 'both'])
    parser.add_argument('--runtimes', nargs='+', default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument('--reps', type=int, default=10, help='alternations per row (bs 16: half)')
    args = parser.parse_args(argv)
    import timm
    from timm.utils import reparameterize_model

    print(machine_line() + '\n', flush=True)
    model, images, _ = golden_model(args.variant)
    deploy = reparameterize_model(model)
    baseline = timm.create_model(BASELINES[args.variant]).eval()
    with torch.no_grad():
        ref = deploy(images).numpy()
    forms = ['direct', 'toeplitz'] if args.large_kernel == 'both' else [args.large_kernel]
    rows = [['runtime', f'smpconv_{args.variant} large kernels', 'batch', 'max |logit error| / max |logit|',
             'ours ms', f'{BASELINES[args.variant]} ms', 'ratio (min-max)']]
    with tempfile.TemporaryDirectory() as tmp:
        files: Dict[str, str] = {form: export(deploy, os.path.join(tmp, f'ours_{form}.onnx'), form) for form in forms}
        files['baseline'] = export(baseline, os.path.join(tmp, 'baseline.onnx'))
        for runtime in args.runtimes:
            base_run = RUNTIMES[runtime](files['baseline'])
            for form in forms:
                run = RUNTIMES[runtime](files[form])
                err = float(np.abs(run(images.numpy()) - ref).max() / np.abs(ref).max())
                if not err < 1e-4:
                    raise SystemExit(f'{runtime}, {form}: logits off by {err:.1e} x max |logit| (bound 1e-4)')
                for bs in args.batches:
                    x = np.random.default_rng(0).standard_normal((bs, 3, 224, 224), dtype=np.float32)
                    reps = args.reps if bs <= 8 else max(3, args.reps // 2)
                    a, b, r, lo, hi = interleaved(lambda: run(x), lambda: base_run(x), 'cpu', reps)
                    rows.append([runtime, form, str(bs), f'{err:.1e}', f'{a:.1f}', f'{b:.1f}', ratio_cell(r, lo, hi)])
                    print(f'  {runtime} {form} bs {bs}: {r:.2f}x', file=sys.stderr, flush=True)
    print(table(rows))


if __name__ == '__main__':
    main()
