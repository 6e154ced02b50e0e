"""Fixtures for hub/tests/: the golden data (tests/golden_fixtures.py) and the local Hub (tests/hub_fixtures.py);
pyproject's pytest ``pythonpath`` puts tests/ and hub/ on the path."""
import warnings

from golden_fixtures import *  # noqa: F401,F403

warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
