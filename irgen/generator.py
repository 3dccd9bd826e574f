"""IRGen stage 2: image encoder + identifier decoder, trained to emit the identifier of a same-class image.

Training: for every training image of class c the target is the identifier of a randomly drawn DATABASE image of
class c (`RetrievalDataModule.target_pool`: the training split, In-shop's train + gallery under closed-set, and
closed-set validation queries, which are held out as inputs only; the draw may pick the image itself). Targets
are redrawn every epoch from ``(seed, epoch)``, so runs and resumed runs see the same targets. Loss:
label-smoothed cross-entropy over the D levels. The ``optimizer`` / ``scheduler`` nodes (AdamW, no decay on
biases/norms; conf/model/irgen_generator.yaml), the encoder at ``encoder_lr_scale`` times the decoder's
learning rate (0 freezes it: no backward through the encoder). The pipeline can start the encoder from the tokenizer's
trained one (``encoder_init: tokenizer``).

Evaluation (overrides the shared loop's ranking, keeps its metrics): each evaluated image is encoded once; its
global token (L2-normalised) is kept for the kNN and rerank rows, and query images are beam-searched in the same
step (all encoder tokens are needed by the decoder and never stored). The trie holds the identifiers of the eval
set's GALLERY records (closed_set: the database the model trained on; zero_shot: test images it never saw as
targets). Three rows are logged per stage (`rank_gallery`): ``R@k``, ``P@k``, ``P@k_irgen``, ... as the paper
ranks, ``rerank/...`` (beam candidates by cosine) and ``knn/...`` (exact kNN over the same features), optionally
``exhaustive/...``.

Identifiers come from the tokenizer artifact via `set_identifiers(codes)` (``codes[record_id]``); they are a
buffer of the module, so a checkpoint evaluates without the artifact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from irgen.artifact import NO_IDENTIFIER
from irgen.beam_search import beam_search
from irgen.decoder import DecoderConfig, IdentifierDecoder
from irgen.encoder_token_cache import EncoderTokenCache
from irgen.encoders import build_encoder_from_config
from irgen.ranking import expand_identifiers, rank_identifiers, rerank_by_similarity, score_all_identifiers
from irgen.trie import IdentifierTrie, validate_codes
from irlab.checkpoints import read_state_dict
from irlab.inference import evaluation_mode
from irlab.module import RetrievalModule
from irlab.optim import module_optimization
from irlab.plain import to_plain
from irlab.retrieval import RetrievalReport, evaluate_rankings
from irlab.retrieval.ann import ROW_LABELS as ANN_ROW_LABELS

# the ranking rows of every IRGen evaluation, as `irlab.reporting` labels them (metric key infix -> label)
RANKING_ROWS = {"": "generative (paper)", "rerank": "generative + rerank", "knn": "kNN, same encoder",
                "exhaustive": "exhaustive scoring", **ANN_ROW_LABELS}


def draw_same_class(labels: np.ndarray, seed: int, epoch: int, pool_labels: np.ndarray | None = None) -> np.ndarray:
    """For each position of `labels`, a uniformly drawn position of `pool_labels` (default: `labels` itself,
    the drawing position allowed) with the same label; vectorized and deterministic given (seed, epoch).

    One draw per epoch gives every visit of an image a fresh target, as the reference's per-step draw does.
    """
    labels = np.asarray(labels)
    pool = labels if pool_labels is None else np.asarray(pool_labels)
    rng = np.random.default_rng((seed, epoch))
    order = np.argsort(pool, kind="stable")
    classes, start, size = np.unique(pool[order], return_index=True, return_counts=True)
    cls = np.searchsorted(classes, labels)
    if np.any(cls >= len(classes)) or np.any(classes[np.minimum(cls, len(classes) - 1)] != labels):
        missing = sorted(set(labels.tolist()) - set(classes.tolist()))[:5]
        raise ValueError(f"no target image for training classes {missing}: the target pool must hold every class")
    pick = start[cls] + np.floor(rng.random(len(labels)) * size[cls]).astype(np.int64)
    return order[pick]


def identifiers_of(codes: torch.Tensor, record_ids: np.ndarray) -> np.ndarray:
    """The identifiers of `record_ids`; a clear error for records the tokenizer stage did not encode."""
    out = codes.cpu().numpy()[np.asarray(record_ids)]
    missing = (out == NO_IDENTIFIER).all(1) if len(out) else np.zeros(0, bool)
    if missing.any():
        raise ValueError(f"{int(missing.sum())} of {len(out)} records have no identifier (e.g. record "
                         f"{int(np.asarray(record_ids)[missing][0])}): the tokenizer stage encodes the training "
                         f"targets, the validation set and the test gallery only")
    return out


# generative: validation during training ranks by beam search alone and encodes only the validation queries
# (the kNN and rerank rows need every gallery image encoded: In-shop ~35k images per validation); all: all rows
VALIDATION_ROWS = ("generative", "all")


class IRGenGenerator(RetrievalModule):
    ranks_by_exact_knn = False  # its own ranking is beam search; the ANN rows compare with its kNN row
    index_kind = "identifiers"  # a saved index holds the gallery's identifiers; search is beam search

    def __init__(
        self,
        code_depth: int | None = None,
        codebook_size: int | None = None,
        encoder: Mapping | None = None,
        encoder_init: str | None = "tokenizer",
        width: int = 768,
        layers: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        encoder_lr_scale: float = 0.01,
        optimizer: Mapping | None = None,
        scheduler: Mapping | None = None,
        label_smoothing: float = 0.1,
        beam_size: int = 30,
        eval_ks: Sequence[int] = (1, 10, 20, 30),
        max_rank: int = 100,
        exhaustive: bool = False,
        validation_rows: str = "generative",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if validation_rows not in VALIDATION_ROWS:
            raise ValueError(f"validation_rows must be one of {VALIDATION_ROWS}, got {validation_rows!r}")
        if code_depth is None or codebook_size is None:
            raise ValueError("code_depth and codebook_size must be the identifier artifact's D and K: irgen.pipeline "
                             "fills them from the artifact; when building the generator yourself, pass them")
        encoder = dict(to_plain(encoder) or {})  # plain containers: checkpoints stay loadable with weights_only=True
        eval_ks = [int(k) for k in to_plain(eval_ks)]
        optimizer, scheduler = to_plain(optimizer), to_plain(scheduler)
        self.save_hyperparameters()
        self.encoder = build_encoder_from_config(encoder)
        self.decoder = IdentifierDecoder(DecoderConfig(
            depth_levels=code_depth, codebook_size=codebook_size, width=width, layers=layers, heads=heads,
            mlp_ratio=mlp_ratio, dropout=dropout, memory_dim=self.encoder.dim,
        ))
        if encoder_lr_scale == 0:  # frozen encoder (e.g. the tokenizer's): no backward through it, much faster
            self.encoder.requires_grad_(False)
        self._token_cache = EncoderTokenCache()
        self.eval_ks = tuple(int(k) for k in eval_ks)
        self.register_buffer("codes", torch.empty(0, code_depth, dtype=torch.long))
        self._targets: torch.Tensor | None = None
        self._trie: IdentifierTrie | None = None
        self._query_mask: torch.Tensor | None = None
        self._generative_only = False  # this evaluation ranks by beam search alone (`validation_rows`)

    # ---- identifiers -------------------------------------------------------------------------------------
    def set_identifiers(self, codes: torch.Tensor | np.ndarray) -> None:
        """Identifier of every datamodule record, ``int64 [N_records, D]`` (the artifact's ``codes``)."""
        arr = np.asarray(codes.detach().cpu() if isinstance(codes, torch.Tensor) else codes)
        encoded = (arr != NO_IDENTIFIER).any(1) if arr.ndim == 2 else np.ones(len(arr), bool)
        validate_codes(arr[encoded], self.hparams.codebook_size)  # rows of NO_IDENTIFIER: records never emitted
        arr = arr.astype(np.int64)
        if arr.shape[1] != self.hparams.code_depth:
            raise ValueError(f"identifiers have {arr.shape[1]} levels but the generator was built for "
                             f"code_depth={self.hparams.code_depth}; build it from the artifact's shape")
        self.codes = torch.from_numpy(arr).to(self.codes.device)

    def load_encoder_weights(self, path: str | Path) -> None:
        """Start from another module's trained encoder (``encoder.*`` tensors of a Lightning checkpoint or a
        plain state dict, e.g. the tokenizer's ``last.ckpt``): safe loading, shapes must match exactly."""
        state = read_state_dict(path, "encoder checkpoint")
        encoder_state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        if not encoder_state:
            raise ValueError(f"{path} holds no 'encoder.*' weights: pass a tokenizer/generator checkpoint")
        try:
            self.encoder.load_state_dict(encoder_state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"the encoder in {path} does not fit this generator's encoder "
                             f"{self.hparams.encoder}: use the tokenizer's encoder settings or encoder_init=null"
                             f"\n{exc}") from exc

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "codes" in state_dict:  # the buffer's size is the dataset's: adopt the checkpoint's
            self.codes = torch.empty_like(state_dict[prefix + "codes"], device=self.codes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _record_codes(self, record_ids: np.ndarray) -> np.ndarray:
        dm = self.trainer.datamodule
        if self.codes.shape[0] == 0:
            raise RuntimeError("the generator has no identifiers: call set_identifiers(artifact.codes) before "
                               "fit/validate/test (irgen.pipeline does this from the tokenizer artifact)")
        if self.codes.shape[0] != dm.num_records:
            raise ValueError(f"the generator holds identifiers for {self.codes.shape[0]} records but the datamodule "
                             f"has {dm.num_records}: the artifact belongs to another dataset/protocol")
        return identifiers_of(self.codes, record_ids)

    # ---- training ---------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)[:, 0]

    @property
    def encoder_frozen(self) -> bool:
        return self.hparams.encoder_lr_scale == 0

    def train(self, mode: bool = True) -> IRGenGenerator:
        """A frozen encoder stays in eval mode: its BatchNorm statistics do not drift while the decoder trains, so
        the kNN row scores exactly the encoder the generator was given."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        # Lightning restores every submodule's own mode after a validation run instead of calling train()
        if self.encoder_frozen and self.encoder.training:
            self.encoder.eval()

    def on_train_epoch_start(self) -> None:
        dm = self.trainer.datamodule
        pool_ids, pool_labels = dm.target_pool()  # the database: closed-set keeps validation queries as targets
        drawn = draw_same_class(dm.train_labels, self.hparams.seed, self.current_epoch, pool_labels)
        self._targets = torch.from_numpy(self._record_codes(pool_ids[drawn])).to(self.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        targets = self._targets[batch["index"]]  # [B, D]
        if self.encoder_frozen:
            with torch.no_grad():
                memory = self._token_cache.tokens(batch["index"], batch["image"], self.encoder)
        else:
            memory = self.encoder(batch["image"])
        logits = self.teacher_forced_logits(memory, targets)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), label_smoothing=self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/code_acc", (logits.argmax(-1) == targets).float().mean())
        return loss

    def teacher_forced_logits(self, memory: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Logits [B, D, K] of every level of the target identifiers [B, D] given the encoder tokens `memory`."""
        logits = self.decoder(self.decoder.input_tokens(targets).unsqueeze(1), self.decoder.memory_kv(memory))
        return logits.squeeze(1).float()

    def configure_optimizers(self):
        """The encoder at ``encoder_lr_scale`` x the decoder's rate (a frozen one is left out); no weight decay on
        biases and norms (the reference's ``add_weight_decay``)."""
        hp = self.hparams
        groups = []
        for module, scale in ((self.encoder, hp.encoder_lr_scale), (self.decoder, 1.0)):
            params = [p for p in module.parameters() if p.requires_grad]
            groups.append({"params": [p for p in params if p.dim() >= 2], "lr_scale": scale})
            groups.append({"params": [p for p in params if p.dim() < 2], "lr_scale": scale, "weight_decay": 0.0})
        return module_optimization(self, groups)

    # ---- retrieval for arbitrary queries (eval.py query=...) ------------------------------------------------
    score_name = "log-probability of the image's identifier"

    def index_gallery(self, loader, record_ids: np.ndarray | None = None) -> IdentifierTrie:
        """The prefix trie of the gallery images' identifiers. Only dataset images have one (the checkpoint carries
        every record's identifier); images from elsewhere would need the tokenizer, which the checkpoint lacks."""
        if record_ids is None:
            raise ValueError("an IRGen generator retrieves only images with identifiers, i.e. images of the dataset "
                             "it was trained with: drop gallery= to search that dataset's test gallery")
        if self.codes.shape[0] == 0:
            raise RuntimeError("the generator has no identifiers: load a generator checkpoint (it carries them)")
        codes = identifiers_of(self.codes, record_ids)
        return IdentifierTrie.build(codes, self.hparams.codebook_size).to(self.device)

    def search(self, gallery_index: IdentifierTrie, images: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Beam search (``beam_size`` beams) constrained to the gallery's identifiers; images of one identifier in
        gallery order, each scored by its identifier's log-probability."""
        with evaluation_mode(self):
            tokens = self.encoder(images.to(self.device))
            leaves, scores = beam_search(self.decoder, tokens, gallery_index, self.hparams.beam_size)
        return expand_identifiers(leaves.cpu().numpy(), scores.float().cpu().numpy(), gallery_index, k)

    # ---- evaluation --------------------------------------------------------------------------------------
    def _start_eval(self, stage: str) -> None:
        eval_set = self.trainer.datamodule.eval_set(stage)
        self._generative_only = (stage == "val" and self.trainer.state.fn == "fit"
                                 and self.hparams.validation_rows == "generative")
        gallery_codes = self._record_codes(eval_set.record_ids[eval_set.gallery_mask])
        self._trie = IdentifierTrie.build(gallery_codes, self.hparams.codebook_size).to(self.device)
        self._query_mask = torch.from_numpy(eval_set.query_mask).to(self.device)

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        super().on_test_epoch_start()
        self._start_eval("test")

    def evaluation_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each image is encoded once: ``embedding`` (global token, for the kNN and rerank rows), and for the
        query images their beams, ``leaves`` (trie leaf of each beam, -1 for non-queries) and ``scores``
        (log-probabilities); with ``exhaustive``, the score of every gallery identifier."""
        index = batch["index"]
        n, beams = len(index), self.hparams.beam_size
        is_query = self._query_mask[index]
        outputs = {"leaves": torch.full((n, beams), -1, dtype=torch.long, device=self.device),
                   "scores": torch.full((n, beams), -torch.inf, device=self.device)}
        if self._generative_only:  # only the queries' beams are ranked: gallery images are not encoded
            if is_query.any():
                outputs["leaves"][is_query], outputs["scores"][is_query] = beam_search(
                    self.decoder, self.encoder(batch["image"][is_query]), self._trie, beams)
            return outputs
        tokens = self.encoder(batch["image"])
        outputs["embedding"] = F.normalize(tokens[:, 0].float(), dim=-1)
        if is_query.any():
            outputs["leaves"][is_query], outputs["scores"][is_query] = beam_search(
                self.decoder, tokens[is_query], self._trie, beams)
        if self.hparams.exhaustive:
            outputs["exhaustive"] = torch.full((n, self._trie.num_leaves), -torch.inf, device=self.device)
            if is_query.any():
                outputs["exhaustive"][is_query] = score_all_identifiers(self.decoder, tokens[is_query],
                                                                        self._trie.leaf_codes)
        return outputs

    def rank_gallery(self, stage: str, outputs: dict[str, np.ndarray], eval_set) -> RetrievalReport:
        """Three rankings of the same queries, logged side by side (see the module docstring):

        * ``<metric>`` -- generative retrieval as the paper ranks it: beam order, the images of one identifier
          in database order, the list cut to ``beam_size`` images (the reference's ``anss[:k]``);
        * ``rerank/<metric>`` -- the first ``max_rank`` images of the beams' identifiers reordered by cosine
          similarity of the encoder's global features;
        * ``knn/<metric>`` -- exact kNN over the same features (the linear-scan baseline);
        * optionally ``exhaustive/<metric>``: every identifier scored by teacher forcing, paper order.

        ``eval_set`` may be a subset of the stage's set (limited loaders): beams were searched against the full
        gallery's trie, so images outside the evaluated subset are dropped from the rankings.
        """
        sub_of_full = self._trie_item_to_subset_row(stage, eval_set)
        q_labels, g_labels = eval_set.labels[eval_set.query_mask], eval_set.labels[eval_set.gallery_mask]
        exclude = eval_set.self_exclusion()
        spare = 1 if (exclude >= 0).any() else 0  # the query itself may take a slot before it is removed
        leaves, scores = outputs["leaves"][eval_set.query_mask], outputs["scores"][eval_set.query_mask]

        def expanded(leaves: np.ndarray, scores: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
            nb, sc = expand_identifiers(leaves, scores, self._trie, depth)
            return np.where(nb >= 0, sub_of_full[np.maximum(nb, 0)], -1), sc

        def evaluate(nb: np.ndarray, sc: np.ndarray, depth: int | None) -> RetrievalReport:
            return evaluate_rankings(nb, sc, q_labels, g_labels, exclude=exclude, ks=self.eval_ks, depth=depth)

        beam = self.hparams.beam_size
        report = evaluate(*expanded(leaves, scores, beam + spare), beam)
        report.metrics["identifiers"] = float(self._trie.num_leaves)
        report.metrics["images_per_identifier"] = self._trie.num_items / max(1, self._trie.num_leaves)
        if "embedding" not in outputs:  # validation during training, validation_rows=generative
            return report
        features = outputs["embedding"]
        query_features, gallery_features = eval_set.queries(features), eval_set.gallery(features)
        candidates, _ = expanded(leaves, scores, self.hparams.max_rank + spare)
        reranked = evaluate(*rerank_by_similarity(candidates, query_features, gallery_features), None)
        report.metrics.update({f"rerank/{k}": v for k, v in reranked.metrics.items()})
        knn = super().rank_gallery(stage, outputs, eval_set)
        report.metrics.update({f"knn/{k}": v for k, v in knn.metrics.items()})
        report.other_curves = {RANKING_ROWS["rerank"]: reranked.pr_curve, RANKING_ROWS["knn"]: knn.pr_curve}
        report.curve_label = RANKING_ROWS[""]
        report.score_name = "log-probability of the image's identifier (beam search)"
        if "exhaustive" in outputs:
            all_leaves, all_scores = rank_identifiers(outputs["exhaustive"][eval_set.query_mask])
            exhaustive = evaluate(*expanded(all_leaves, all_scores, len(sub_of_full)), None)
            report.metrics.update({f"exhaustive/{k}": v for k, v in exhaustive.metrics.items()})
        return report

    def _trie_item_to_subset_row(self, stage: str, eval_set) -> np.ndarray:
        """Trie items are the rows of the stage's full gallery; map each to its row in ``eval_set``'s gallery
        (-1 where a limited loader left it out). The identity when the whole set was evaluated."""
        full = self.trainer.datamodule.eval_set(stage)
        n_full = len(full.gallery_positions)
        if len(eval_set) == len(full):
            return np.arange(n_full)
        pos = np.searchsorted(full.record_ids, eval_set.record_ids)  # record_ids are sorted and unique
        full_gallery_row = np.full(len(full), -1, dtype=np.int64)
        full_gallery_row[full.gallery_positions] = np.arange(n_full)
        subset_row = np.full(n_full, -1, dtype=np.int64)
        subset_row[full_gallery_row[pos[eval_set.gallery_mask]]] = np.arange(int(eval_set.gallery_mask.sum()))
        return subset_row
