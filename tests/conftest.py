import os
import sys

# Shared test helpers (tests/distributed.py, tests/gpt_harness.py) import by plain name,
# in pytest and in the worker processes it spawns.
sys.path.insert(0, os.path.dirname(__file__))
