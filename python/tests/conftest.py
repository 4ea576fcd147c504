"""Shared fixtures: a fresh random seed per test, printed so a failure can be replayed
(SPECDEC_TEST_SEED=<seed> pytest ...)."""
import os
import random

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    seed = int(os.environ.get("SPECDEC_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"{request.node.name}: seed {seed} (SPECDEC_TEST_SEED={seed} replays it)")
    return np.random.default_rng(seed)
