"""LightningModule base for every retrieval model: embed, gather across ranks, evaluate, log.

The evaluation contract: per evaluated image a model returns named outputs (`evaluation_outputs`, default
``{"embedding": L2-normalised embed(images)}``; IRGen's generator adds its beams ``leaves``/``scores``). The
shared loop collects them with the images' dataset positions, gathers them from every rank (the distributed
sampler pads with duplicates, so positions de-duplicate them), and rank 0 hands them, in eval-set order, to
`rank_gallery` -- exact kNN over ``embedding`` by default, a method's own ranking where it overrides it. The
metrics are broadcast so that every rank logs the same values. Only rank 0 ever holds the gathered outputs
(`irlab.sharding`), and they are dropped once ranked: callbacks get the report, not the embeddings.
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
from irlab.inference import evaluation_mode, map_images
from irlab.reproducibility import rng_states, set_rng_states
from irlab.retrieval import RetrievalReport, evaluate_embeddings
from irlab.retrieval.ann import approximate_rows
from irlab.sharding import gather_rows

log = logging.getLogger(__name__)
# evaluation metrics are computed on rank 0 and broadcast, so every rank logs the same value: no sync_dist needed
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


@dataclass
class EvalResult:
    """Everything callbacks need after an evaluation: metrics plus the data that produced them."""

    stage: str
    report: RetrievalReport
    num_items: int  # images evaluated (rows of the evaluated set)
    query_positions: np.ndarray  # eval-set positions of the queries (rows of report.neighbors)
    gallery_positions: np.ndarray  # eval-set positions of the gallery (values of report.neighbors index these)
    positions: np.ndarray | None = None  # full eval-set position of each row above when a limited loader saw a subset


def is_last_epoch(trainer: L.Trainer) -> bool:
    """The epoch now ending is the run's last by ``max_epochs`` (re-fits, figures and full-state checkpoints are
    always done for it, whatever their cadence)."""
    return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs


class RetrievalModule(L.LightningModule):
    """Shared validation/test loop. Subclasses: `embed` and `training_step`; `evaluation_outputs` and `rank_gallery`
    where a method ranks by more than an embedding."""

    eval_ks: tuple[int, ...] = (1, 2, 4, 8)

    def __init__(self) -> None:
        super().__init__()
        self._eval_outputs: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
        self.last_eval: EvalResult | None = None
        # models with codebooks (IRGen's tokenizer) set it at each evaluation: {"usage": [counts per code, one
        # array per level], other scalars}; `callbacks.codebook_usage` logs and draws it, None draws nothing
        self.codebook_usage: dict | None = None
        # evaluation.indexes (set by callbacks.approximate_search): ANN rows beside the exact one
        self.evaluation_indexes: dict[str, dict] = {}

    # ---- to implement ---------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unit_embedding(self, images: torch.Tensor) -> torch.Tensor:
        """`embed` in float32, L2-normalised: what evaluation and query search compare by inner product."""
        return F.normalize(self.embed(images).float(), dim=-1)

    # ---- retrieval for arbitrary queries (eval.py query=...: irlab.query) ------------------------------
    score_name = "cosine similarity"
    # what a saved index keeps (irlab.saved_index): "embedding" (searched with faiss) or "identifiers" (IRGen)
    index_kind = "embedding"

    def index_gallery(self, loader, record_ids: np.ndarray | None = None) -> torch.Tensor:
        """What `search` ranks: the L2-normalised embeddings of every image of `loader` (in its order).
        ``record_ids`` are the dataset records behind them, None for images from outside the dataset."""
        return map_images(self, self.unit_embedding, loader)

    def search(self, gallery_index, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The top-`k` gallery rows of each query image and their scores, ``[Q, k]`` each (-1 / NaN padded)."""
        with evaluation_mode(self):
            queries = self.unit_embedding(images.to(self.device)).cpu()
        scores, rows = torch.topk(queries @ gallery_index.T, min(k, len(gallery_index)), dim=1)
        pad = k - rows.shape[1]
        return (np.pad(rows.numpy(), ((0, 0), (0, pad)), constant_values=-1),
                np.pad(scores.numpy(), ((0, 0), (0, pad)), constant_values=np.nan))

    # ---- exact resume --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the random-number generators so a resumed run draws the same batches, flips and targets."""
        checkpoint["rng_states"] = rng_states()
        checkpoint[MODEL_KEY] = model_class_name(self)  # lets a wrong checkpoint be named (irlab.checkpoints)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])

    # ---- evaluation -----------------------------------------------------------------------------------
    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Named per-image outputs of an evaluation batch (first dimension: the batch), handed to `rank_gallery`
        in eval-set order. Methods that rank by more than an embedding add their own (IRGen: beams)."""
        return {"embedding": self.unit_embedding(batch["image"])}

    def on_validation_epoch_start(self) -> None:
        self._eval_outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        outputs = {name: value.detach() for name, value in self.evaluation_outputs(batch).items()}
        self._eval_outputs.append((batch["index"].detach(), outputs))

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _gathered_outputs(self, n_items: int) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        """({name: [N, ...] array in eval-set order}, bool mask of positions seen), assembled from every rank on
        global rank 0 (`irlab.sharding.gather_rows`: one rank's rows at a time, nothing kept on the others, ranks
        may hold different counts); None on the other ranks.

        Positions seen twice (sampler padding) carry identical values. Positions never seen only happen when
        the loader was limited (``limit_val_batches``) or images were unreadable (``dataset.skip_corrupt``); the
        caller then evaluates the seen subset.
        """
        if not self._eval_outputs:
            raise RuntimeError("evaluation produced no outputs: is the evaluation dataloader empty?")
        chunks, self._eval_outputs = self._eval_outputs, []
        index = torch.cat([c[0] for c in chunks]).cpu()
        names = list(chunks[0][1])
        seen = gather_rows(torch.ones(len(index), dtype=torch.bool), index, n_items, dst=0, fill=False)
        gathered = {}
        for name in names:
            first = chunks[0][1][name]
            value = torch.empty((len(index), *first.shape[1:]), device=first.device,
                                dtype=torch.float32 if first.is_floating_point() else first.dtype)
            start = 0
            for c in chunks:  # batch by batch into one tensor, each batch freed once copied (no 2x peak)
                part = c[1].pop(name)
                value[start:start + len(part)] = part
                start += len(part)
            full = gather_rows(value, index, n_items, dst=0)
            del value
            if full is not None:
                gathered[name] = full.numpy()
        return (gathered, seen.numpy()) if seen is not None else None

    def rank_gallery(self, stage: str, outputs: dict[str, np.ndarray], eval_set) -> RetrievalReport:
        """Default retrieval: exact inner-product kNN of the query embeddings against the gallery embeddings.

        ``outputs`` are `evaluation_outputs` for every image of ``eval_set`` (in its order); ``eval_set`` may be
        a subset of the stage's set when the loader was limited."""
        embeddings = outputs["embedding"]
        return evaluate_embeddings(
            eval_set.queries(embeddings),
            eval_set.gallery(embeddings),
            eval_set.queries(eval_set.labels),
            eval_set.gallery(eval_set.labels),
            exclude=eval_set.self_exclusion(),
            ks=self.eval_ks,
        )

    # the model's own ranking is exact kNN over outputs["embedding"] (its neighbours serve the ANN recall column)
    ranks_by_exact_knn = True

    def approximate_rows(self, embeddings: np.ndarray, eval_set, report: RetrievalReport) -> dict[str, float]:
        """``evaluation.indexes``' rows over the same embeddings (`irlab.retrieval.ann`)."""
        exact = report.neighbors if self.ranks_by_exact_knn else None
        return approximate_rows(self.evaluation_indexes, eval_set.queries(embeddings), eval_set.gallery(embeddings),
                                eval_set.queries(eval_set.labels), eval_set.gallery(eval_set.labels),
                                exclude=eval_set.self_exclusion(), ks=self.eval_ks, exact_neighbors=exact)

    def _finish_evaluation(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            self._eval_outputs = []
            return
        eval_set = self.trainer.datamodule.eval_set(stage)
        gathered = self._gathered_outputs(len(eval_set))
        metrics: dict[str, float] | None = None
        if gathered is not None:  # global rank 0: it holds every output and runs the search
            outputs, seen = gathered
            positions = None
            if not seen.all():
                log.warning(f"{stage}: evaluating {int(seen.sum())} of {len(eval_set)} images (limited loader or "
                            f"unreadable images)")
                positions = np.flatnonzero(seen)
                eval_set, outputs = eval_set.subset(positions), {k: v[seen] for k, v in outputs.items()}
            log.info(f"{stage}: ranking {len(eval_set)} images on rank 0")
            start = time.perf_counter()
            report = self.rank_gallery(stage, outputs, eval_set)
            metrics = {k: float(v) for k, v in report.metrics.items()}
            metrics["search_seconds"] = time.perf_counter() - start
            if self.evaluation_indexes and "embedding" in outputs:
                metrics.update(self.approximate_rows(outputs["embedding"], eval_set, report))
            # what callbacks draw on; not the outputs themselves (5.8 GB for AREIR's SOP embedding)
            self.last_eval = EvalResult(stage, report, len(eval_set), eval_set.query_positions,
                                        eval_set.gallery_positions, positions)
            del outputs
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value, prog_bar=key == "R@1", sync_dist=False, rank_zero_only=False)
