"""Fixtures of the training tests (helpers.py holds the plain builders and the script runner)."""

import pytest
from helpers import tiny_teacher


@pytest.fixture(scope="session")
def tiny_models():
    """A tiny SnapGen UNet and a tiny SD3 transformer teacher with matching text widths."""
    from diffusers_snapgen.testing import tiny_unet

    return tiny_unet(), tiny_teacher()
