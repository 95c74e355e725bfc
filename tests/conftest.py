"""Shared fixtures: one tiny synthetic world per test session (the real default world is
larger)."""
import pytest

from tools import synthetic

# Small enough that a test epoch takes seconds on 2 cores, big enough for every split to have a few
# shapes.
TINY_WORLD = dict(num_shapes=96, num_points=512, num_test_per_class=3, seed=0)
# The smallest training command line: demo preset, tiny encoder, few points, no workers.
TINY_TRAIN = ["--preset", "demo", "--scaling", "tiny", "--num-points", "256", "--batch-size", "16",
              "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return synthetic.build_world(tmp_path_factory.mktemp("world") / "synthetic", progress=False,
                                 **TINY_WORLD)
