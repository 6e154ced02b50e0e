"""SMPConv image models for timm: ``import smpconv_timm`` registers ``smpconv_t`` and ``smpconv_b``.

Installed from a wheel (or ``pip install -e``), the package also registers them whenever timm is imported
(``_autoload/``; ``SMPCONV_AUTOLOAD=0`` turns that off). timm's train.py checks its config with the device module
``smpconv_timm.train_check``, which this file does not import: train.py must import it after parsing its arguments.
"""
from .checkpoint import CheckpointError, load_checkpoint_file, select_state_dict
from .layers import RADIUS_LR_SCALE, RADIUS_MAX, RADIUS_MIN, SMPConv2d, clamp_radii_, smp_kernel
from .smpconv import SMPConvNet, checkpoint_filter_fn, smpconv_b, smpconv_t
from . import config
from .download import guard_hf_hub_configs
from .hf import save_for_hf
from .variants import HF_HUB_NAMESPACE, MODEL_NAMES, VARIANTS, Variant

__version__ = '0.1.0'

guard_hf_hub_configs()  # create_model('hf-hub:<namespace>/smpconv_...'): the config download gets the guard's errors
