"""The SMPConv variants: one table that registration, default cfgs, the model card, the CLI and the tests read.

Architectures and release regularisation from the authors' code (``smp_imagenet/models/SMPConv.py`` and the
training commands of ``smp_imagenet/README.md`` in github.com/sangnekim/SMPConv); top-1 as reported in the paper
(Kim & Park, CVPR 2023, arXiv:2304.02330), cited, not re-measured here.
"""
import dataclasses
from typing import Any, Dict, Tuple

__all__ = ['Variant', 'VARIANTS', 'MODEL_NAMES', 'PRETRAINED_TAG', 'HF_HUB_NAMESPACE', 'PUBLISHED_NAMESPACE',
           'HUB_REPOS_PUBLISHED', 'AUTHORS_RELEASE_URL']

from .config import HF_HUB_NAMESPACE  # forks and mirrors: SMPCONV_HF_NAMESPACE, read when smpconv_timm is imported

#: the tag of the pretrained weights: the authors' ImageNet-1k checkpoints
PRETRAINED_TAG = 'in1k'

#: The Hub namespace of this project's weight repos (``HF_HUB_NAMESPACE`` unless ``SMPCONV_HF_NAMESPACE`` is set),
#: whether they are up yet, and where the authors' release files are (Google Drive links, their ImageNet README):
#: until the repos are up, download errors for them say so, once.
PUBLISHED_NAMESPACE = 'smpconv-timm'
HUB_REPOS_PUBLISHED = False
AUTHORS_RELEASE_URL = 'https://github.com/sangnekim/SMPConv/tree/main/smp_imagenet'


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    depths: Tuple[int, ...]  # units (large-kernel block + FFN block) per stage
    dims: Tuple[int, ...]  # channels per stage
    kernel_sizes: Tuple[int, ...]  # SMP kernel grid per stage
    drop_path_rate: float  # the release's training value (the model default is 0, as in timm)
    paper_top1: float  # ImageNet-1k val top-1 (%) reported in the paper

    @property
    def arch_args(self) -> Dict[str, Any]:
        """The ``SMPConvNet`` arguments that define the architecture."""
        return dict(depths=self.depths, dims=self.dims, kernel_sizes=self.kernel_sizes)

    @property
    def pretrained_name(self) -> str:
        return f'{self.name}.{PRETRAINED_TAG}'

    @property
    def hf_hub_id(self) -> str:
        return f'{HF_HUB_NAMESPACE}/{self.pretrained_name}'


VARIANTS: Dict[str, Variant] = {v.name: v for v in (
    Variant('smpconv_t', (2, 2, 8, 2), (96, 192, 384, 768), (31, 29, 27, 13), drop_path_rate=0.1, paper_top1=82.5),
    Variant('smpconv_b', (2, 2, 20, 2), (128, 256, 512, 1024), (31, 29, 27, 13), drop_path_rate=0.5, paper_top1=83.8),
)}

MODEL_NAMES: Tuple[str, ...] = tuple(VARIANTS)
