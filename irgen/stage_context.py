"""What IRGen's stages share (`PipelineContext`) and how they name the command that rebuilds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from datamodules.base import RetrievalDataModule
from irgen.artifact import IdentifierArtifact, load_artifact
from irgen.signatures import artifact_expectation
from irlab.run_config import current_run_overrides, this_command

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
                                          rebuild_hint=rebuild_command("tokenizer"))
        return self.artifact


def rebuild_command(stage: str) -> str:
    """The command line that rebuilds `stage`'s outputs for this run (outside a Hydra run: a template)."""
    if not current_run_overrides():
        return f"python train.py experiment=<your irgen experiment> irgen.stage={stage} irgen.rebuild=true"
    return this_command(f"irgen.stage={stage}", "irgen.rebuild=true", drop=("irgen.stage=", "irgen.rebuild="))
