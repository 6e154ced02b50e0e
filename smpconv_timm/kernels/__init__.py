"""The kernels behind SMPConv's speed, all plain PyTorch ops (no compiled extension).

- ``dwconv``: the large depthwise conv, forward and a custom backward, the fastest algorithm per shape.
- ``fastpath``: eval with every BatchNorm folded and activations / residual adds fused into oneDNN convs (under
  ``torch.compile`` too, as one op of the graph).
- ``pointwise``: 1x1 convs in training as oneDNN's conv or as ``F.linear`` on the channels-last rows, whichever is
  faster here.
- ``recompute``: training that recomputes the FFN's 4x-wide BN / GELU outputs in backward instead of storing them.
- ``runtime``: the one tracing predicate, autocast queries, the context folds run in, and caches kept out of copies
  and pickles.

Their switches are in ``smpconv_timm.config``.
"""
from . import dwconv, pointwise
from .dwconv import ALGORITHMS, crop_kernel, crop_taps
from .fastpath import FusedConv, act_name, batch_split, begin_forward, cached_plan, compiled_eval, compiled_eval_applies, \
    drop_plan, end_forward, inference_path
from .recompute import bn_gelu_conv, recompute_applies
from .runtime import CACHE_ATTRS, TransientCaches, autocast_dtype, fold_mode, is_fx_tracing, is_tracing, \
    release_free_memory
