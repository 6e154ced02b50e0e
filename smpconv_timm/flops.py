"""Parameter and FLOP counts of smpconv models, measured with fvcore.

fvcore counts one multiply-add as one flop. It traces the model with ``torch.jit.trace``, so it sees the
large depthwise conv as ``aten::_convolution`` and the point-to-kernel interpolation as ``aten::matmul``
(both counted). Element-wise ops (the |x - u| distances, ReLU, GELU, residual adds) are not counted, as
everywhere in fvcore: this is how the authors' 6.283 G (T) / 18.220 G (B) at 224 were counted.
"""
import dataclasses
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = ['ModelComplexity', 'model_complexity', 'resolve_model_name']


@dataclasses.dataclass
class ModelComplexity:
    name: str
    input_size: Tuple[int, int, int, int]
    params: int
    flops: int  # fvcore flops = multiply-adds
    activations: int
    stage_flops: Dict[str, int]  # top-level module name -> flops, in forward order
    by_operator: Dict[str, int]


def resolve_model_name(name: str) -> str:
    """``name`` if it is a registered smpconv model (tag allowed), else ValueError listing those that exist."""
    import timm
    from . import MODEL_NAMES
    base = name.split('.', 1)[0]
    if base not in MODEL_NAMES or not timm.is_model(base):
        raise ValueError(f'unknown model {name!r}; smpconv models: {", ".join(timm.list_models("smpconv_*"))}')
    return name


def model_complexity(
        model: Union[str, nn.Module],
        img_size: Union[int, Tuple[int, int]] = 224,
        batch_size: int = 1,
        **model_kwargs,
) -> ModelComplexity:
    """fvcore params / FLOPs / activations of a model (instance or registered smpconv name) at an input size."""
    from fvcore.nn import ActivationCountAnalysis, FlopCountAnalysis
    if isinstance(model, str):
        import timm
        name = resolve_model_name(model)
        model = timm.create_model(name, **model_kwargs)
    else:
        name = type(model).__name__
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = getattr(model, 'in_chans', 3)
    p = next(model.parameters())
    x = torch.randn(batch_size, in_chans, h, w, device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops = FlopCountAnalysis(model, x)
            flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            acts = ActivationCountAnalysis(model, x)
            acts.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
            by_module = flops.by_module()
            parts = [n for n, _ in model.named_children()]
            if 'stages' in parts:  # one column per stage
                i = parts.index('stages')
                parts[i:i + 1] = [f'stages.{j}' for j in range(len(model.stages))]
            stage_flops = {n: by_module.get(n, 0) for n in parts}
            result = ModelComplexity(
                name=name,
                input_size=(batch_size, in_chans, h, w),
                params=sum(p.numel() for p in model.parameters()),
                flops=flops.total(),
                activations=acts.total(),
                stage_flops=stage_flops,
                by_operator=dict(flops.by_operator()),
            )
    finally:
        model.train(was_training)
    return result


def format_table(results: Sequence[ModelComplexity]) -> str:
    """A plain-text table: one row per model, per-stage GFLOPs as columns."""
    stage_names = []
    for r in results:
        stage_names += [n for n in r.stage_flops if n not in stage_names]
    header = ['model', 'input', 'params', 'GFLOPs', 'Mact'] + [f'{n}' for n in stage_names]
    rows = [header]
    for r in results:
        rows.append([
            r.name, 'x'.join(map(str, r.input_size)), f'{r.params:,}', f'{r.flops / 1e9:.3f}',
            f'{r.activations / 1e6:.2f}'] + [f'{r.stage_flops.get(n, 0) / 1e9:.3f}' for n in stage_names])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ['  '.join(c.ljust(wi) if i == 0 else c.rjust(wi) for i, (c, wi) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, '  '.join('-' * wi for wi in widths))
    return '\n'.join(lines)
