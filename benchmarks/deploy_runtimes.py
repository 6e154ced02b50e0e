"""The deploy form outside PyTorch: exported to ONNX, checked, and timed in ONNX Runtime and OpenVINO against
ConvNeXt exported and run the same way.

    pip install -e ".[deploy]"                                   # onnx, onnxscript, onnxruntime, openvino
    python benchmarks/deploy_runtimes.py                         # smpconv_t vs convnext_tiny, bs 1 and 16
    python benchmarks/deploy_runtimes.py --large-kernel toeplitz # the large kernels exported as matrix products
    python benchmarks/deploy_runtimes.py --profile --batches 16  # where each runtime's time goes, by kind of op
    python benchmarks/deploy_runtimes.py --large-kernel direct --runtimes "ONNX Runtime" \\
        --ort-options default extended no-spinning denormal-as-zero   # ONNX Runtime's session settings, a row each

Both models are exported with ``torch.onnx.export(..., dynamo=True)`` (dynamic batch, 224x224). SMPConv is the
deploy form (``timm.utils.reparameterize_model``) of the golden weights; its fp32 logits in each runtime are checked
against PyTorch's on the golden images (bound: 1e-4 x max |logit|) before anything is timed. ``--large-kernel``
picks how the large depthwise convs are exported: ``direct`` (one depthwise ``Conv`` node each) or ``toeplitz``
(``smpconv_timm.config.set_dwconv_algorithms(forward='toeplitz')``: each kernel row a banded matrix, one grouped
``Conv`` over the image rows, valid at the exported width), ``both`` for a row each. The runtimes run fp32 (OpenVINO's
``INFERENCE_PRECISION_HINT`` set to f32: on CPUs with AMX it would otherwise pick bf16) with the thread count of
this process; each row alternates ours and ConvNeXt. ``--profile`` prints, instead of the timings, each runtime's own
per-node times summed by kind of op (ONNX Runtime's session profiler, OpenVINO's performance counters) for one forward
at the first of ``--batches``, averaged over forwards after a warm-up; ours exported in the first ``--large-kernel``
form (``direct`` by default).
"""
import argparse
import collections
import functools
import json
import os
import sys
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from common import golden_model, interleaved, machine_line, ratio_cell, table  # benchmarks/common.py, beside this file

BASELINES = {'t': 'convnext_tiny', 'b': 'convnext_base'}


def export(model: torch.nn.Module, path: str, large_kernel: str = 'direct', size: int = 224) -> str:
    from smpconv_timm import config
    x = torch.randn(2, 3, size, size)
    batch = torch.export.Dim('batch', min=1, max=1024)
    algo = 'toeplitz' if large_kernel == 'toeplitz' else 'auto'
    with config.set_dwconv_algorithms(forward=algo), torch.no_grad():
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: batch},), external_data=False)
    return path


#: ONNX Runtime session settings a deployment might choose (``--ort-options``): ORT's own defaults (all graph
#: optimizations, NCHWc layout included; spinning worker threads), the optimizations without the layout ones, worker
#: threads that sleep instead of spinning, denormals flushed to zero
ORT_OPTIONS = {
    'default': {},
    'extended': {'level': 'ORT_ENABLE_EXTENDED'},
    'no-spinning': {'session.intra_op.allow_spinning': '0'},
    'denormal-as-zero': {'session.set_denormal_as_zero': '1'},
}


def onnxruntime_session(path: str, preset: str = 'default') -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    for key, value in ORT_OPTIONS[preset].items():
        if key == 'level':
            options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        else:
            options.add_session_config_entry(key, value)
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def openvino_session(path: str, precision: Optional[str] = 'f32') -> Callable[[np.ndarray], np.ndarray]:
    """``precision``: OpenVINO's INFERENCE_PRECISION_HINT for what is not int8, None for its default (bf16 on CPUs
    with AVX512-BF16 or AMX)."""
    import openvino as ov
    core = ov.Core()
    hint = {} if precision is None else {'INFERENCE_PRECISION_HINT': precision}
    compiled = core.compile_model(path, 'CPU', {**hint, 'INFERENCE_NUM_THREADS': torch.get_num_threads()})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})[0]


RUNTIMES = {'ONNX Runtime': onnxruntime_session, 'OpenVINO': openvino_session}


def conv_kind(kernel: List[int], group: int) -> str:
    k = 'x'.join(str(s) for s in kernel)
    return '1x1 conv' if k == '1x1' else f'depthwise conv {k}' if group > 1 else f'conv {k}'


def onnxruntime_profile(path: str, x: np.ndarray, reps: int) -> Dict[str, float]:
    """ms per forward by kind of op: ONNX Runtime's node times, convs told apart by the optimized graph's attributes."""
    import onnx
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.enable_profiling = True
    options.profile_file_prefix = path + '.profile'
    options.optimized_model_filepath = path + '.optimized.onnx'
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    name = session.get_inputs()[0].name
    for _ in range(reps + 1):
        session.run(None, {name: x})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    kinds = {}
    for node in onnx.load(options.optimized_model_filepath).graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kinds[node.name] = conv_kind(attrs.get('kernel_shape', []), attrs.get('group', 1)) \
            if node.op_type == 'Conv' and 'kernel_shape' in attrs else node.op_type
    runs = sorted(e['ts'] + e['dur'] for e in events if e['name'] == 'model_run')
    times: Dict[str, float] = collections.Counter()
    for e in events:  # the first run (warm-up) left out
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time') and e['ts'] > runs[0]:
            node = e['name'][:-len('_kernel_time')]
            times[kinds.get(node, e['args'].get('op_name', node))] += e['dur'] / 1000 / reps
    return times


def openvino_profile(path: str, x: np.ndarray, reps: int, precision: bool = False) -> Dict[str, float]:
    """ms per forward by kind of op: OpenVINO's performance counters (those of the last inference), summed;
    ``precision`` tells the kernels' precisions apart (e.g. ``depthwise conv, f32`` / ``1x1 conv, I8``)."""
    import openvino as ov
    compiled = ov.Core().compile_model(path, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32', 'PERF_COUNT': True,
                                                     'INFERENCE_NUM_THREADS': torch.get_num_threads()})
    request = compiled.create_infer_request()
    request.infer({0: x})
    times: Dict[str, float] = collections.Counter()
    for _ in range(reps):
        request.infer({0: x})
        for p in request.get_profiling_info():
            kind = {'GroupConvolution': 'depthwise conv', 'FullyConnected': 'FullyConnected (matmul)',
                    'Convolution': '1x1 conv' if '1x1' in p.exec_type else 'conv (not 1x1)'}.get(p.node_type, p.node_type)
            if precision:
                kind += ', ' + p.exec_type.rsplit('_', 1)[-1]
            times[kind] += p.real_time.total_seconds() * 1000 / reps
    return times


PROFILERS = {'ONNX Runtime': onnxruntime_profile, 'OpenVINO': openvino_profile}


def profile_table(runtime: str, files: Dict[str, str], x: np.ndarray, reps: int, variant: str) -> str:
    ours, base = PROFILERS[runtime](files['ours'], x, reps), PROFILERS[runtime](files['baseline'], x, reps)
    rows = [['op', f'smpconv_{variant} ms', f'{BASELINES[variant]} ms']]
    for kind in sorted(set(ours) | set(base), key=lambda k: -(ours[k] + base[k])):
        if ours[kind] + base[kind] >= 0.05 * len(x):
            rows.append([kind, f'{ours[kind]:.1f}' if kind in ours else '-', f'{base[kind]:.1f}' if kind in base else '-'])
    rows.append(['all nodes', f'{sum(ours.values()):.1f}', f'{sum(base.values()):.1f}'])
    return f'{runtime}, bs {len(x)}\n\n' + table(rows)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variant', default='t', choices=list(BASELINES))
    parser.add_argument('--batches', type=int, nargs='+', default=[1, 16])
    parser.add_argument('--large-kernel', default='both', choices=['direct', 'toeplitz', 'both'])
    parser.add_argument('--runtimes', nargs='+', default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument('--reps', type=int, default=10, help='alternations per row (bs 16: half)')
    parser.add_argument('--ort-options', nargs='+', default=['default'], choices=list(ORT_OPTIONS),
                        help='ONNX Runtime session settings, a row each (default: ORT\'s own)')
    parser.add_argument('--profile', action='store_true', help='time per kind of op in each runtime instead')
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
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            files = {'ours': export(deploy, os.path.join(tmp, 'ours.onnx'), forms[0]),
                     'baseline': export(baseline, os.path.join(tmp, 'baseline.onnx'))}
            x = np.random.default_rng(0).standard_normal((args.batches[0], 3, 224, 224), dtype=np.float32)
            for runtime in args.runtimes:
                reps = max(2, args.reps // (args.batches[0] // 8 + 1))
                print(profile_table(runtime, files, x, reps, args.variant) + '\n', flush=True)
        return
    rows = [['runtime', f'smpconv_{args.variant} large kernels', 'batch', 'max |logit error| / max |logit|',
             'ours ms', f'{BASELINES[args.variant]} ms', 'ratio (min-max)']]
    with tempfile.TemporaryDirectory() as tmp:
        files: Dict[str, str] = {form: export(deploy, os.path.join(tmp, f'ours_{form}.onnx'), form) for form in forms}
        files['baseline'] = export(baseline, os.path.join(tmp, 'baseline.onnx'))
        sessions = []  # (row label, session maker): ONNX Runtime once per --ort-options preset
        for runtime in args.runtimes:
            if runtime == 'ONNX Runtime':
                sessions += [(runtime if p == 'default' else f'{runtime}, {p}',
                              functools.partial(onnxruntime_session, preset=p)) for p in args.ort_options]
            else:
                sessions.append((runtime, RUNTIMES[runtime]))
        for runtime, session in sessions:
            base_run = session(files['baseline'])
            for form in forms:
                run = session(files[form])
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
