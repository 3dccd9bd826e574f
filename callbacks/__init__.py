"""Lightning callbacks configured under ``conf/callbacks/``: one small class per module.

Evaluation itself happens inside `irlab.module.RetrievalModule`; these callbacks only *consume* its
``last_eval`` (figures, statistics) or watch training (throughput, learning rate).
"""

from callbacks.codebook_usage import CodebookUsage
from callbacks.lr_monitor import SafeLearningRateMonitor
from callbacks.pr_curve import PRCurvePlot
from callbacks.retrieval_grid import RetrievalGrid
from callbacks.throughput import ImagesPerSecond

__all__ = ["CodebookUsage", "ImagesPerSecond", "PRCurvePlot", "RetrievalGrid", "SafeLearningRateMonitor"]
