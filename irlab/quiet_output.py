"""A run's output says what matters to an irlab user: Lightning's lines that say nothing to them are dropped.

Dropped: the "💡 Tip" advertising a cloud service (printed by every Trainer), the notice that ``limit_*_batches=1.0``
uses 100% of the batches (every preset sets them, so the notice is always true and always printed), the notice
that irlab's own summary callback replaces Lightning's default one (`callbacks.model_summary`), and a
deprecation warning from Lightning's own pytree helper (nothing a user can act on). Everything else stays.
"""

from __future__ import annotations

import logging
import warnings

NOISE = ("💡 Tip: ", "was configured so 100% of the batches",
         "Trainer already configured with model summary callbacks")
LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in NOISE)


def quiet_lightning() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, DropLightningNoise) for f in logger.filters):
        logger.addFilter(DropLightningNoise())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
