"""Does earlier fp32 work in a process change bf16 batch-1 speed? SMPConv-T (deploy) against ConvNeXt-T.

    python benchmarks/bf16_process_state.py        # fresh process
    python benchmarks/bf16_process_state.py x      # after three fp32 bs-16 forwards of both models

Kept as it was when it reproduced the README's "full run" state (1.14-1.16x, against 0.98-1.01x fresh): a tidier
version (models built channels-last up front, one bf16 warm-up call each) did not reproduce it. Both models are
cast with ``.to(torch.bfloat16)``, input channels-last, timed alternately, medians per window of 15 rounds.
"""
import copy
import statistics
import sys
import time

import torch
import timm
from timm.utils import reparameterize_model

import smpconv_timm  # noqa: F401

torch.manual_seed(0)
base = timm.create_model('convnext_tiny').eval()
ours = timm.create_model('smpconv_t').eval()
deploy = copy.deepcopy(reparameterize_model(ours)).to(torch.bfloat16)
b16 = copy.deepcopy(base).to(torch.bfloat16)
x = torch.randn(1, 3, 224, 224).contiguous(memory_format=torch.channels_last).bfloat16()


def ms(m):
    s = time.perf_counter()
    with torch.no_grad():
        m(x)
    return 1000 * (time.perf_counter() - s)


if len(sys.argv) > 1:  # first fp32 bs-16 work, as bench.py's eval rows do before its mode rows
    xf = torch.randn(16, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for m in (base.to(memory_format=torch.channels_last), ours.to(memory_format=torch.channels_last)):
            for _ in range(3):
                m(xf)
for w in range(4):
    a, b = [], []
    for _ in range(15):
        a.append(ms(deploy))
        b.append(ms(b16))
    print('window %d: smpconv_t deploy %.1f ms, convnext_tiny %.1f ms, ratio %.2fx'
          % (w, statistics.median(a), statistics.median(b), statistics.median(a) / statistics.median(b)), flush=True)
