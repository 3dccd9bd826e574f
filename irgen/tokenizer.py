"""IRGen's semantic image tokenizer: an image encoder whose global feature is residual-quantized.

Training (IRGen, arXiv 2303.10126): a cosine classifier is applied to the raw feature and to every
partial reconstruction (sum of the first d codewords, d = 1..D), plus a commitment term pulling the feature
towards its reconstructions; gradients reach the encoder through the straight-through estimator. The loss on
partial reconstructions is what makes short prefixes already class-discriminative, i.e. decodable
coarse-to-fine. Codebooks are k-means-initialised and then re-fitted every epoch (``codebook_update=refit``)
or EMA-tracked (``ema``); see `irgen.quantizer`. ``refit`` is the default: on the embedded dataset it gave
quantized R@1 0.50 vs 0.39 for the best EMA setting, mean of 3 seeds (numbers in conf/model/irgen_tokenizer.yaml).

Validation logs retrieval with the quantized feature as ``val/R@1`` (reconstruction cosine) and with the raw
feature as ``val/raw_R@1``, so checkpoint selection looks at what the identifiers can do.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from irgen.encoders import build_encoder_from_config
from irgen.kmeans import check_enough_points
from irgen.quantizer import Quantized, ResidualQuantizer
from irlab.code_usage import codes_perplexity
from irlab.inference import map_dataset_sharded
from irlab.losses import LinearSoftmaxLoss, NormalizedSoftmaxLoss, class_logits, head_accuracy
from irlab.module import RetrievalModule, is_last_epoch
from irlab.optim import module_optimization
from irlab.plain import to_plain
from irlab.retrieval import RetrievalReport, evaluate_embeddings

log = logging.getLogger(__name__)

UPDATES = ("refit", "ema")
DEFAULT_LOSS = {"raw": 1.0, "partial": 1.0, "commit": 0.25}
LOSS_FORMS = ("irlab", "reference")
HEADS = ("cosine_shared", "linear_separate")


class IRGenTokenizer(RetrievalModule):
    ranks_by_exact_knn = False  # its reported ranking is the quantized feature's; ANN rows search the raw one
    def __init__(
        self,
        num_classes: int,
        encoder: Mapping | None = None,
        feature_dim: int | None = None,
        num_levels: int = 4,
        num_codes: int = 256,
        codebook_update: str = "refit",
        ema_decay: float = 0.9,
        dead_code_threshold: float = 0.1,
        kmeans_niter: int = 20,
        refit_every: int = 1,
        kmeans_max_points: int | None = None,
        min_points_per_code: int = 4,
        loss_weights: Mapping | None = None,
        loss_form: str = "irlab",
        head: str = "cosine_shared",
        temperature: float = 0.05,
        encoder_lr_scale: float = 0.1,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        encoder = dict(to_plain(encoder) or {})
        loss_weights = {**DEFAULT_LOSS, **dict(to_plain(loss_weights) or {})}
        if set(loss_weights) - set(DEFAULT_LOSS):
            raise ValueError(f"loss_weights keys must be {sorted(DEFAULT_LOSS)}, got {sorted(loss_weights)}")
        if refit_every < 1:
            raise ValueError(f"refit_every must be >= 1 (epochs between codebook re-fits), got {refit_every}")
        if codebook_update not in UPDATES:
            raise ValueError(f"codebook_update must be one of {UPDATES}, got {codebook_update!r}")
        if loss_form not in LOSS_FORMS or head not in HEADS:
            raise ValueError(f"loss_form must be one of {LOSS_FORMS} and head one of {HEADS}, got {loss_form!r}, "
                             f"{head!r}")
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)  # plain data: weights_only checkpoints
        self.save_hyperparameters()
        self.encoder = build_encoder_from_config(encoder)
        dim = feature_dim or self.encoder.dim
        self.proj = nn.Linear(self.encoder.dim, dim) if feature_dim else nn.Identity()
        self.quantizer = ResidualQuantizer(num_levels, num_codes, dim, ema_decay=ema_decay)
        if head == "cosine_shared":  # one normalized-softmax head for the raw feature and every reconstruction
            self.classifier = NormalizedSoftmaxLoss(num_classes, dim, temperature)
            self.partial_classifier = None
        else:  # the reference's: a linear head for the raw feature, another shared by the reconstructions
            self.classifier = LinearSoftmaxLoss(num_classes, dim)
            self.partial_classifier = LinearSoftmaxLoss(num_classes, dim)
        self.train_accuracy = head_accuracy(num_classes)  # the raw feature's classifier, per epoch
        self.loss_weights = loss_weights
        self._refit_epoch = -1
        # codebook usage of the last evaluation (`code_usage`), what `callbacks.codebook_usage` draws

    # ---- features and identifiers ---------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised global (class-token) feature [B, dim]: the vector that is quantized."""
        return F.normalize(self.proj(self.encoder.global_feature(images)), dim=-1)

    def quantize(self, features: torch.Tensor) -> Quantized:
        return self.quantizer(features.detach())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Identifiers int64 [B, D]."""
        return self.quantizer.encode(self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The raw (unquantized) feature; evaluation also scores its quantized reconstruction."""
        return self.features(images)

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """``embedding``: the raw feature; ``quantized``: the normalised full reconstruction (the reported row)."""
        z = self.features(batch["image"]).float()
        if not bool(self.quantizer.initialized):  # e.g. a sanity check before the k-means initialisation
            return {"embedding": z, "quantized": z}
        return {"embedding": z, "quantized": F.normalize(self.quantizer(z).partials[:, -1], dim=-1)}

    # ---- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]
        z = self.features(images)
        q = self.quantize(z)
        # straight-through: the classifier sees the reconstruction, the encoder receives its gradient as if
        # it had been applied to z itself
        partial_st = z[:, None] + (q.partials - z[:, None]).detach()
        loss_raw = self.classifier(z, labels)
        with torch.no_grad():
            self.train_accuracy(class_logits(self.classifier, z.detach()), labels)
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True)
        partial_head = self.partial_classifier or self.classifier
        per_level = torch.stack([partial_head(partial_st[:, d], labels)
                                 for d in range(self.quantizer.num_levels)])
        if self.hparams.loss_form == "irlab":  # mean over levels; squared distance summed over dimensions
            loss_partial = per_level.mean()
            commit = (z[:, None] - q.partials).pow(2).sum(-1).mean()
        else:  # the reference: sums over levels of the cross-entropy and of the element-wise mean squared error
            loss_partial = per_level.sum()
            commit = (z[:, None] - q.partials).pow(2).mean(dim=(0, 2)).sum()
        w = self.loss_weights
        loss = w["raw"] * loss_raw + w["partial"] * loss_partial + w["commit"] * commit
        if self.hparams.codebook_update == "ema":
            reseeded = self.quantizer.ema_update(z.detach(), q.codes, self.hparams.dead_code_threshold)
            self.log("train/reseeded_codes", float(reseeded), reduce_fx="sum")
        self.log_dict({"train/loss": loss, "train/loss_raw": loss_raw, "train/loss_partial": loss_partial,
                       "train/commit": commit}, prog_bar=False)
        self.log("train/perplexity_l0", codes_perplexity(q.codes[:, 0], self.quantizer.num_codes))
        return loss

    # ---- codebook fitting -----------------------------------------------------------------------------
    def training_features(self) -> torch.Tensor | None:
        """Features of the training split with the evaluation transform (at most ``kmeans_max_points``), on global
        rank 0 (None on the others): every rank encodes its shard on its device under the trainer's precision."""
        dm = self.trainer.datamodule
        dataset = dm.train_dataset(transform=dm.eval_transform())
        limit = self.hparams.kmeans_max_points
        if limit and len(dataset) > limit:
            rng = np.random.default_rng(self.hparams.seed + max(0, self.current_epoch))
            dataset = dm.record_dataset(dataset.ids[np.sort(rng.choice(len(dataset), limit, replace=False))])
        (features,) = map_dataset_sharded(self, self.unquantized_features(forward_context(self._trainer)),
                                          dataset, dm.inference_loader, dst=0, fill=float("nan"),
                                          label="codebook fit")
        if features is not None and torch.isnan(features[:, 0]).any():  # unreadable images (skip_corrupt)
            features = features[~torch.isnan(features[:, 0])]
        return features

    def unquantized_features(self, context) -> Callable[[torch.Tensor], tuple[torch.Tensor]]:
        """images -> (float32 L2-normalised features,), the encoder run inside `context` (autocast or none)."""
        def run(images: torch.Tensor) -> tuple[torch.Tensor]:
            with context():
                z = self.features(images)
            return (F.normalize(z.float(), dim=-1),)
        return run

    @torch.no_grad()
    def refit_codebooks(self, features: torch.Tensor | None = None) -> dict[str, float]:
        """k-means every level on (the residuals of) `features`, default: the training split's features.

        Under DDP every rank encodes its shard of the training split, rank 0 gathers them and fits (faiss
        k-means: seconds at 65k points), then every rank receives the same codebooks.
        """
        info: dict[str, float] = {}
        trainer = self._trainer
        if features is None:
            features = self.training_features()
        if trainer is None or trainer.is_global_zero:
            check_enough_points(len(features), self.quantizer.num_codes, self.hparams.min_points_per_code)
            info = self.quantizer.fit(features, niter=self.hparams.kmeans_niter, seed=self.hparams.seed)
        if trainer is not None and trainer.world_size > 1:
            state = trainer.strategy.broadcast({k: v.cpu() for k, v in self.quantizer.state_dict().items()}, src=0)
            self.quantizer.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        return info

    def _refit(self, when: str) -> None:
        info = self.refit_codebooks()
        self._refit_epoch = self.current_epoch
        reseeded = sum(info.values())
        log.info(f"tokenizer: k-means codebooks fitted ({when}, epoch {self.current_epoch}); "
                 f"{int(reseeded)} dead codes re-seeded")

    def on_train_start(self) -> None:
        if not bool(self.quantizer.initialized):  # fresh run (a resumed one restores its codebooks)
            self._refit("initialisation")
            self._refit_epoch = -1

    def _refit_due(self) -> bool:
        """A ``refit`` epoch end that has not re-fitted yet: every ``refit_every``-th epoch and the last one."""
        if self.hparams.codebook_update != "refit" or self._refit_epoch == self.current_epoch:
            return False
        return is_last_epoch(self.trainer) or (self.current_epoch + 1) % self.hparams.refit_every == 0

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        # re-fit at the end of a training epoch, *before* validation and checkpointing see the codebooks
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self._refit_due():
            self._refit("epoch end")

    def on_train_epoch_end(self) -> None:
        if self._refit_due():
            self._refit("epoch end, no validation")  # epochs without validation still re-fit

    # ---- evaluation -----------------------------------------------------------------------------------
    def rank_gallery(self, stage: str, outputs: dict[str, np.ndarray], eval_set) -> RetrievalReport:
        """Quantized-feature retrieval is the reported one (``R@1``); the raw feature's is ``raw_R@1``."""
        reports = {}
        for name, part in (("raw", outputs["embedding"]), ("quantized", outputs["quantized"])):
            reports[name] = evaluate_embeddings(eval_set.queries(part), eval_set.gallery(part),
                                                eval_set.queries(eval_set.labels), eval_set.gallery(eval_set.labels),
                                                exclude=eval_set.self_exclusion(), ks=self.eval_ks, normalize=True)
        report = reports["quantized"]
        report.metrics = {**report.metrics, **{f"raw_{k}": v for k, v in reports["raw"].metrics.items()}}
        if bool(self.quantizer.initialized):  # codebook usage for callbacks.codebook_usage (W&B histograms)
            self.codebook_usage = self.code_usage(torch.from_numpy(outputs["embedding"]).to(self.device))
        return report

    @torch.no_grad()
    def code_usage(self, features: torch.Tensor) -> dict:
        """{"usage": per level, images per code; "distinct_identifiers"} of `features` (the callback derives
        used fractions and perplexities from the counts: `callbacks.codebook_usage.usage_summary`)."""
        codes = self.quantizer.encode(features).cpu().numpy()
        usage = [np.bincount(codes[:, d], minlength=self.quantizer.num_codes) for d in range(codes.shape[1])]
        return {"usage": usage, "distinct_identifiers": float(len(np.unique(codes, axis=0)))}

    def configure_optimizers(self):
        hp = self.hparams
        heads = [p for m in (self.proj, self.classifier, self.partial_classifier) if m is not None
                 for p in m.parameters()]
        groups = [{"params": self.encoder.parameters(), "lr_scale": hp.encoder_lr_scale}, {"params": heads}]
        return module_optimization(self, groups)


def identifier_record_ids(datamodule) -> np.ndarray:
    """Sorted ids of the records the pipeline needs encoded: the training targets (what the generator learns to
    emit), the test gallery (the trie of valid identifiers) and the validation set (the identifier statistics).
    Test queries need none: the generator maps them to identifiers itself (In-shop: 37,915 of 52,712 images)."""
    split = datamodule.split
    test = split.test
    return np.unique(np.concatenate([split.target_ids, split.val.record_ids, test.record_ids[test.gallery_mask]]))


def forward_context(trainer) -> Callable:
    """The trainer's precision context for forward passes outside its loops (bf16 autocast under
    ``precision=bf16-mixed``), or none without a trainer."""
    return trainer.precision_plugin.forward_context if trainer is not None else contextlib.nullcontext


def encode_records(model: IRGenTokenizer, datamodule, record_ids: np.ndarray | None = None, trainer=None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(identifiers int64 [n, D] on every rank, features float32 [n, dim] on global rank 0 and None elsewhere) of
    `record_ids` (default: every record), in that order.

    The pass is split across DDP ranks (`irlab.inference.map_dataset_sharded`) on the model's device, the encoder
    under the trainer's precision and the quantizer in float32. The evaluation transform makes identifiers a
    deterministic function of the checkpoint and the precision.
    """
    ids = np.arange(datamodule.num_records) if record_ids is None else np.asarray(record_ids, dtype=np.int64)
    features_of = model.unquantized_features(forward_context(trainer))

    def codes_and_features(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (z,) = features_of(images)
        return model.quantizer.encode(z), z

    codes, feats = map_dataset_sharded(model, codes_and_features, datamodule.record_dataset(ids),
                                       datamodule.inference_loader, dst=(None, 0), fill=-1, label="identifiers")
    if (codes < 0).any():
        raise RuntimeError(f"identifiers for {int((codes >= 0).all(1).sum())} of {len(ids)} images: unreadable images "
                           f"were skipped (dataset.skip_corrupt=true); every image needs an identifier, fix or remove "
                           f"them")
    return codes, feats
