"""Hands ``evaluation.indexes`` (conf/evaluation/) to the model being evaluated: `irlab.builders.build_trainer`
adds this callback to every trainer when indexes are configured, so every method and stage that evaluates
embeddings (the baseline, AREIR, IRGen's tokenizer and its generator's kNN row) reports the ANN rows of
`irlab.retrieval.ann` without a setting of its own."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L

from irlab.module import RetrievalModule


class ApproximateSearchRows(L.Callback):
    def __init__(self, indexes: Mapping[str, Mapping]) -> None:
        self.indexes = {name: dict(settings) for name, settings in indexes.items()}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if isinstance(pl_module, RetrievalModule):
            pl_module.evaluation_indexes = self.indexes
