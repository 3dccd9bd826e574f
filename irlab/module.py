"""LightningModule base for every retrieval model: embed, gather across ranks, evaluate, log.

A model subclass implements `embed(images) -> [B, d]` (and `training_step`). Validation and test then work the
same for every method: each rank embeds its share of the evaluated set, embeddings are gathered *with their
dataset positions* (the distributed sampler pads with duplicates, so positions de-duplicate them), rank 0 runs
the exact kNN search and metrics, and the numbers are broadcast so that every rank logs the same values.
Methods that rank differently (IRGen's beam search) override `rank_gallery`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from irlab.checkpoints import MODEL_KEY, model_class_name
from irlab.reproducibility import rng_states, set_rng_states
from irlab.retrieval import RetrievalReport, evaluate_embeddings

log = logging.getLogger(__name__)
# evaluation metrics are computed on rank 0 and broadcast, so every rank logs the same value: no sync_dist needed
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


@dataclass
class EvalResult:
    """Everything callbacks need after an evaluation: metrics plus the data that produced them."""

    stage: str
    report: RetrievalReport
    embeddings: np.ndarray  # [N, d] for the whole evaluated set, in eval-set order
    query_positions: np.ndarray  # eval-set positions of the queries (rows of report.neighbors)
    gallery_positions: np.ndarray  # eval-set positions of the gallery (values of report.neighbors index these)
    positions: np.ndarray | None = None  # full eval-set position of each row above when a limited loader saw a subset


class RetrievalModule(L.LightningModule):
    """Shared validation/test loop. Subclasses: `embed`, `training_step`, `configure_optimizers`."""

    eval_ks: tuple[int, ...] = (1, 2, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self._eval_chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last_eval: EvalResult | None = None

    # ---- to implement ---------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---- exact resume --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the random-number generators so a resumed run draws the same batches, flips and targets."""
        checkpoint["rng_states"] = rng_states()
        checkpoint[MODEL_KEY] = model_class_name(self)  # lets a wrong checkpoint be named (irlab.checkpoints)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    # ---- evaluation -----------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval_chunks = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        embeddings = F.normalize(self.embed(batch["image"]).float(), dim=-1)
        self._eval_chunks.append((batch["index"].detach(), embeddings.detach()))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _gathered_embeddings(self, n_items: int) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings [N, d] in set order, bool mask of positions seen), assembled from every rank.

        Positions seen twice (sampler padding) carry identical values. Positions never seen only happen when
        the loader was limited (``limit_val_batches``); the caller then evaluates the seen subset.
        """
        if not self._eval_chunks:
            raise RuntimeError("evaluation produced no embeddings: is the evaluation dataloader empty?")
        index = torch.cat([c[0] for c in self._eval_chunks])
        emb = torch.cat([c[1] for c in self._eval_chunks])
        self._eval_chunks = []
        if self.trainer.world_size > 1:
            index = self.all_gather(index).reshape(-1)
            emb = self.all_gather(emb).reshape(-1, emb.shape[-1])
        out = torch.zeros(n_items, emb.shape[-1], dtype=torch.float32)
        seen = torch.zeros(n_items, dtype=torch.bool)
        index = index.cpu()
        out[index] = emb.cpu()  # duplicates from sampler padding carry identical values
        seen[index] = True
        return out.numpy(), seen.numpy()

    def rank_gallery(self, stage: str, embeddings: np.ndarray, eval_set) -> RetrievalReport:
        """Default retrieval: exact inner-product kNN of query embeddings against gallery embeddings."""
        return evaluate_embeddings(
            embeddings[eval_set.query_mask],
            embeddings[eval_set.gallery_mask],
            eval_set.labels[eval_set.query_mask],
            eval_set.labels[eval_set.gallery_mask],
            exclude=eval_set.self_exclusion(),
            ks=self.eval_ks,
        )

    def _finish_evaluation(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval_chunks = []
            return
        eval_set = self.trainer.datamodule.eval_set(stage)
        embeddings, seen = self._gathered_embeddings(len(eval_set))
        positions = None
        if not seen.all():
            log.warning(f"{stage}: evaluating {int(seen.sum())} of {len(eval_set)} images (limited loader)")
            positions = np.flatnonzero(seen)
            eval_set, embeddings = eval_set.subset(positions), embeddings[seen]
        metrics: dict[str, float] | None = None
        if self.trainer.is_global_zero:
            start = time.perf_counter()
            report = self.rank_gallery(stage, embeddings, eval_set)
            metrics = {k: float(v) for k, v in report.metrics.items()}
            metrics["search_seconds"] = time.perf_counter() - start
            self.last_eval = EvalResult(
                stage, report, embeddings, eval_set.query_positions, eval_set.gallery_positions, positions
            )
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "R@1", sync_dist=False, rank_zero_only=False)
