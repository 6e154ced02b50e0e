"""Fixtures for tests/: the golden data (``golden_fixtures``) and the local Hub (``hub_fixtures``)."""
import warnings

from golden_fixtures import *  # noqa: F401,F403  (fixtures: golden_dir, make_weights, golden, golden_input, ...)

warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
