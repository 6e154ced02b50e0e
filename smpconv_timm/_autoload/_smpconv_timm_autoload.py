"""Registers the SMPConv models with timm when timm is imported: ``timm.create_model('smpconv_t')``, ``hf-hub:``
and ``local-dir:`` ids and timm's own train.py, validate.py and benchmark.py find them without
``import smpconv_timm``.

Installed by smpconv-timm at the top of site-packages, with ``smpconv_timm_autoload.pth``, whose one line imports
this module when the interpreter starts. That import only puts a finder at the front of ``sys.meta_path``: no
torch, timm or smpconv_timm is imported, and a program that never imports timm pays nothing else. When timm is
imported, the finder lets it load as usual, removes itself, and then imports ``smpconv_timm``, which registers
the models. A failure there becomes one warning: ``import timm`` itself never fails because of it.

``SMPCONV_AUTOLOAD=0`` (read when timm is imported) turns it off; ``import smpconv_timm`` then registers the
models, as it always does. Python started with ``-S`` (no site) does not read .pth files at all.
"""
import os
import sys

ENV = 'SMPCONV_AUTOLOAD'
_OFF = ('0', 'false', 'no', 'off')
_ON = ('', '1', 'true', 'yes', 'on')


class _Loader:
    """timm's own loader, followed by the registration once timm's ``__init__`` has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # timm keeps its own loader
        self.loader.exec_module(module)
        _register()

    def __getattr__(self, name):
        return getattr(self.loader, name)


class TimmFinder:
    """Meta path finder for the top-level ``timm`` only: finds it with the other finders, wraps its loader."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != 'timm':
            return None
        for finder in sys.meta_path:
            find = getattr(finder, 'find_spec', None)
            if finder is cls or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def _register():
    if TimmFinder in sys.meta_path:
        sys.meta_path.remove(TimmFinder)
    value = os.environ.get(ENV, '').strip().lower()
    if value in _OFF or 'smpconv_timm' in sys.modules:  # off, or being imported: it registers the models itself
        return
    import warnings
    if value not in _ON:
        warnings.warn(f'{ENV}={value!r}: expected 0 or 1; the SMPConv models are registered with timm',
                      RuntimeWarning)
    try:
        import smpconv_timm  # noqa: F401  (registers the models)
    except Exception as e:  # noqa: BLE001  (import timm must not fail because of this package)
        warnings.warn(f'smpconv-timm: the SMPConv models could not be registered with timm '
                      f'({type(e).__name__}: {e}); `import smpconv_timm` shows the whole error, {ENV}=0 stops '
                      f'this attempt', RuntimeWarning)


if 'timm' not in sys.modules and TimmFinder not in sys.meta_path:
    sys.meta_path.insert(0, TimmFinder)
