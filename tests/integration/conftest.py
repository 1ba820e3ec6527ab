"""Fixtures for the integration tests."""

import numpy as np
import pytest

from fitstree import Tree


@pytest.fixture
def tree(tmp_path) -> Tree:
    return Tree(tmp_path, np.random.default_rng(7))
