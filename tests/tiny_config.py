"""conftest.tiny_config() as a config file, for command-line runs in tests:

  python -m launch.train --config=tests/tiny_config.py --workdir=W
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_config  # noqa: E402


def get_config():
  return tiny_config()
