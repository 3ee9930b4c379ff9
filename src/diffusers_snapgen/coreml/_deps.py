"""Optional dependencies of the Core ML export (``pip install "diffusers-snapgen[coreml]"``)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings

COREMLTOOLS_VERSION = "9.0"


def require_coremltools():
    """Import coremltools 9.x quietly (it logs runtime-proxy failures on Linux) or raise an actionable ImportError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            previous = logging.getLogger("coremltools").level
            logging.getLogger("coremltools").setLevel(logging.ERROR)
            ct = importlib.import_module("coremltools")
            logging.getLogger("coremltools").setLevel(previous)
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"Core ML export needs coremltools=={COREMLTOOLS_VERSION} and scikit-learn (k-means palettization): "
            'pip install "diffusers-snapgen[coreml]"'
        ) from err
    if not ct.__version__.startswith("9."):
        raise ImportError(f"coremltools {ct.__version__} found; the export is written for {COREMLTOOLS_VERSION}.")
    return ct


def require_sklearn():
    """scikit-learn backs coremltools' k-means palettization."""
    try:
        return importlib.import_module("sklearn")
    except ImportError as err:  # pragma: no cover
        raise ImportError('k-means palettization needs scikit-learn: pip install "diffusers-snapgen[coreml]"') from err


@contextlib.contextmanager
def quiet_progress():
    """Silence the tqdm bars coremltools draws for every conversion pass (our own progress lines stay)."""
    from functools import partialmethod

    from tqdm import tqdm

    original = tqdm.__init__
    tqdm.__init__ = partialmethod(original, disable=True)
    try:
        yield
    finally:
        tqdm.__init__ = original
