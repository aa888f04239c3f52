"""``train_net.py`` with the tests' tiny dataset registered at import time.

Run as a script: launch workers re-import this module, so they register the
dataset too (as a user's own launcher script would register theirs).
"""
import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

import train_net  # noqa: E402  (imports d2_taskdistill first)
from conftest import TINY_ROOT_ENV, register_tiny_dataset  # noqa: E402

register_tiny_dataset(os.environ[TINY_ROOT_ENV])

if __name__ == "__main__":
    train_net.invoke_main()
