"""What IRGen's stages share (`PipelineContext`) and how they name the command that rebuilds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import hydra
from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from irgen.artifact import IdentifierArtifact, load_artifact
from irgen.signatures import artifact_expectation

ARTIFACT_NAME = "identifiers.pt"


@dataclass
class PipelineContext:
    """What stages share: the config, the set-up datamodule, the artifact folder, results so far."""

    cfg: DictConfig
    datamodule: RetrievalDataModule
    artifact_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    artifact: IdentifierArtifact | None = None  # set by the tokenizer stage (built or reused)

    @property
    def artifact_path(self) -> Path:
        return self.artifact_dir / ARTIFACT_NAME

    def identifiers(self) -> IdentifierArtifact:
        """The validated artifact of this run (what the generator stage starts from)."""
        if self.artifact is None:
            self.artifact = load_artifact(self.artifact_path, expected=artifact_expectation(self.cfg, self.datamodule),
                                          rebuild_hint=rebuild_command(self.cfg, "tokenizer"))
        return self.artifact


def rebuild_command(cfg: DictConfig, stage: str) -> str:
    """The command line that rebuilds `stage`'s outputs for this run."""
    try:
        experiment = hydra.core.hydra_config.HydraConfig.get().runtime.choices.get("experiment")
    except ValueError:  # no Hydra context (direct API use)
        experiment = None
    return (f"python train.py experiment={experiment or '<your irgen experiment>'} irgen.stage={stage} "
            f"irgen.rebuild=true (plus this run's other overrides)")
