"""fastsel: fused per-sample scoring and data selection for PyTorch training loops."""

from fastsel._extension import CPU_EXTENSION_AVAILABLE, ExtensionWarning, build_info
from fastsel.backends import BACKENDS, available_backends
from fastsel.ops import MMS_MODES, MmsHead, Scores, mms_head, score
from fastsel import strategies
from fastsel.data import Indexed
from fastsel.costs import Costs
from fastsel.sampler import ScoreSampler
from fastsel.selector import BatchSelector
from fastsel.queue import BatchQueue
from fastsel.selection import (
    POLICIES,
    SCORE_DIRECTIONS,
    History,
    Selection,
    importance_weights,
    percentile,
    sample,
    select,
    select_topk,
)

__version__ = "0.1.0"

__all__ = [
    "score",
    "Scores",
    "MmsHead",
    "mms_head",
    "strategies",
    "Indexed",
    "ScoreSampler",
    "BatchSelector",
    "BatchQueue",
    "Costs",
    "select",
    "select_topk",
    "sample",
    "percentile",
    "importance_weights",
    "Selection",
    "History",
    "SCORE_DIRECTIONS",
    "POLICIES",
    "available_backends",
    "build_info",
    "ExtensionWarning",
    "BACKENDS",
    "MMS_MODES",
    "CPU_EXTENSION_AVAILABLE",
    "__version__",
]
