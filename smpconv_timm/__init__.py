"""SMPConv image models for timm: ``import smpconv_timm`` registers ``smpconv_t`` and ``smpconv_b``."""
from .checkpoint import CheckpointError, load_checkpoint_file, select_state_dict
from .layers import RADIUS_LR_SCALE, RADIUS_MAX, RADIUS_MIN, SMPConv2d, clamp_radii_, smp_kernel
from .smpconv import SMPConvNet, checkpoint_filter_fn, smpconv_b, smpconv_t
from . import config
from .download import guard_hf_hub_configs
from .variants import HF_HUB_NAMESPACE, MODEL_NAMES, VARIANTS, Variant

__version__ = '0.1.0'

guard_hf_hub_configs()  # create_model('hf-hub:<namespace>/smpconv_...'): the config download gets the guard's errors

# Imported by timm's train.py as a device module (`device_modules: [smpconv_timm]`), this checks the running
# config and stops the run, before any data is read, on keys train.py would silently ignore. A no-op elsewhere.
from . import train_check  # noqa: E402  (after the models are registered: it checks the model name)
