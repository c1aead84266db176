"""Selection strategies (the methods of docs/methods.md section 3), each usable
in the in-batch style (``fastsel.BatchSelector``), the epoch style
(``fastsel.ScoreSampler``), or both, as its ``styles`` attribute says."""

from fastsel.strategies.base import TABLE_FIELDS, EpochPlan, ScoreTable, Strategy, StyleError
from fastsel.strategies.epoch_rule import EpochRule
from fastsel.strategies.rescoring import Rescorer
from fastsel.strategies.in_batch import MMS, HardLoss, MaxEntropy, TopScore, Uniform
from fastsel.strategies.budgeted import CSGD, PSGD
from fastsel.strategies.dynams import DynaMS
from fastsel.strategies.hard_batches import HardBatches
from fastsel.strategies.importance import CDFSampling, UpperBoundIS
from fastsel.strategies.infobatch import InfoBatch
from fastsel.strategies.rho_loss import RhoLoss
from fastsel.strategies.selective_backprop import SelectiveBackprop

__all__ = [
    "Strategy", "StyleError", "EpochPlan", "ScoreTable", "TABLE_FIELDS", "EpochRule", "Rescorer",
    "TopScore", "MMS", "HardLoss", "MaxEntropy", "Uniform", "InfoBatch",
    "CDFSampling", "UpperBoundIS", "RhoLoss", "SelectiveBackprop",
    "HardBatches", "DynaMS", "PSGD", "CSGD",
]
