"""Optional dependencies (the package extras): a warning and a skipped figure instead of an ImportError.

``kava[plots]`` installs matplotlib, which only draws figures (demo training curves, sweep reports,
``kava analyze`` heatmaps); without it every command still runs and writes its tables.
"""
from __future__ import annotations

import importlib.util
import logging

log = logging.getLogger(__name__)

PLOTS_HINT = "pip install 'kava[plots]'"


def have_matplotlib(what: str) -> bool:
    """True when matplotlib is importable; else log that ``what`` is skipped and how to get it."""
    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):  # a broken or stubbed-out module
        found = False
    if not found:
        log.warning("%s skipped: matplotlib is not installed (%s)", what, PLOTS_HINT)
    return found
