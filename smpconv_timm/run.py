"""Run one of timm's scripts with the smpconv models registered, where the autoload hook does not.

An installed smpconv-timm registers the models whenever timm is imported, so timm's ``train.py``,
``validate.py`` and ``benchmark.py`` find them as they are. Where that hook does not run (``SMPCONV_AUTOLOAD=0``,
``python -S``, or the package on ``PYTHONPATH`` without being installed), this runner imports ``smpconv_timm``
and then runs the script as ``__main__`` with the remaining arguments:

    python -m smpconv_timm.run path/to/validate.py --model smpconv_t --pretrained --reparam ...
"""
import runpy
import sys

import smpconv_timm  # noqa: F401  (registers the models)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) >= 2 else 2)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
