"""The libraries people fine-tune and deploy timm models with (the ``clients`` extra): imported where installed,
skipped where not; with ``SMPCONV_REQUIRE_CLIENTS=1`` (CI's clients step) a missing one fails instead."""
import importlib
import os

import pytest

__all__ = ['client']


def client(name: str):
    """``import name``: skips the test where it is not installed, unless SMPCONV_REQUIRE_CLIENTS=1."""
    if os.environ.get('SMPCONV_REQUIRE_CLIENTS') == '1':
        module = importlib.import_module(name)
    else:
        module = pytest.importorskip(name)
    print(f'{name} {getattr(module, "__version__", "?")}')
    return module
