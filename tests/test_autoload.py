"""The autoload hook (``smpconv_timm/_autoload/``): ``import timm`` registers the models, in fresh interpreters.

Each test starts a fresh Python that reads the hook's .pth with ``site.addsitedir``, the function that reads
site-packages at start, so the hook runs exactly as an installed wheel runs it. ``.ci/run`` checks the installed
wheel itself.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import smpconv_timm

AUTOLOAD = Path(__file__).resolve().parents[1] / 'smpconv_timm' / '_autoload'
ENV = 'SMPCONV_AUTOLOAD'


def run(code: str, tmp_path: Path, env: dict = None, pythonpath: list = ()) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that read the hook at start; cwd is ``tmp_path`` (no checkout on the path
    but the environment's own)."""
    prelude = f'import site, sys\nsite.addsitedir({str(AUTOLOAD)!r})\n'
    environ = {k: v for k, v in os.environ.items() if k != ENV}
    if pythonpath:
        environ['PYTHONPATH'] = os.pathsep.join([*map(str, pythonpath), environ.get('PYTHONPATH', '')])
    environ.update(env or {})
    return subprocess.run([sys.executable, '-c', prelude + textwrap.dedent(code)], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=300)


def test_import_timm_registers_the_models_and_nothing_is_imported_before(tmp_path):
    p = run('''
        loaded = sorted({'torch', 'timm', 'smpconv_timm'} & set(sys.modules))
        assert loaded == [], loaded
        import timm
        assert timm.list_models('smpconv*') == ['smpconv_b', 'smpconv_t']
        assert timm.list_pretrained('smpconv*') == ['smpconv_b.in1k', 'smpconv_t.in1k']
        model = timm.create_model('smpconv_t', num_classes=3, depths=(1, 1, 1, 1), dims=(8, 8, 8, 8),
                                  kernel_sizes=(5, 5, 5, 5))
        assert type(model).__module__ == 'smpconv_timm.smpconv'
        # the finder is gone, and timm keeps its own loader
        assert not any(getattr(f, '__name__', '') == 'TimmFinder' for f in sys.meta_path)
        assert type(timm.__spec__.loader).__name__ == type(timm.__loader__).__name__ == 'SourceFileLoader'
        print('ok')
    ''', tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == 'ok' and not p.stderr, p.stderr


@pytest.mark.parametrize('first', ['import smpconv_timm', 'from timm.models import create_model'])
def test_any_import_order_works(first, tmp_path):
    p = run(f'''
        {first}
        import timm
        assert timm.is_model('smpconv_t') and timm.is_model('smpconv_b')
        print('ok')
    ''', tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == 'ok' and not p.stderr, p.stderr


@pytest.mark.parametrize('value, registered, warns', [('0', False, False), ('maybe', True, True)])
def test_the_environment_variable_switches_it_off(value, registered, warns, tmp_path):
    p = run('''
        import timm
        print(timm.is_model('smpconv_t'), 'smpconv_timm' in sys.modules)
    ''', tmp_path, env={ENV: value})
    assert p.returncode == 0 and p.stdout.split() == [str(registered)] * 2, p.stderr
    assert (f"{ENV}='maybe': expected 0 or 1" in p.stderr) == warns and p.stderr.count('Warning') == int(warns)


def test_a_failing_registration_is_one_warning_and_timm_still_imports(tmp_path):
    broken = tmp_path / 'broken' / 'smpconv_timm'
    broken.mkdir(parents=True)
    (broken / '__init__.py').write_text("raise RuntimeError('a broken install')\n")
    p = run('''
        import timm
        assert not timm.is_model('smpconv_t')
        timm.create_model('resnet10t')  # timm itself works
        import timm.models  # and nothing is tried again
        print('ok')
    ''', tmp_path, pythonpath=[broken.parent])
    assert p.returncode == 0 and p.stdout.strip() == 'ok', p.stderr
    assert p.stderr.count('Warning') == 1 and 'RuntimeError: a broken install' in p.stderr, p.stderr
    assert f'{ENV}=0' in p.stderr


def test_the_pth_line_imports_only_the_hook():
    assert (AUTOLOAD / 'smpconv_timm_autoload.pth').read_text() == 'import _smpconv_timm_autoload\n'
    source = (AUTOLOAD / '_smpconv_timm_autoload.py').read_text()
    top_level_imports = {line.split()[1] for line in source.splitlines() if line.startswith(('import ', 'from '))}
    assert top_level_imports == {'os', 'sys'}  # both already loaded when site runs: nothing new at start
    assert smpconv_timm.__name__ not in top_level_imports
