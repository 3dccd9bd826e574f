"""DDP evaluation probe, run as a subprocess by tests/test_ddp.py (Lightning re-executes the script for rank 1).

Same as ``python eval.py ...`` (same configs, same runner) but every rank also writes ``rank<k>.json`` into the
run folder with the metrics it ended up logging and the sizes of the sets it ranked itself, so the test can
check that only rank 0 searched and that all ranks agree. Usage:
``python tests/scripts/ddp_eval.py ckpt_path=... trainer=ddp_cpu hydra.run.dir=...``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from irlab.module import RetrievalModule  # noqa: E402
from irlab.runner import run  # noqa: E402

searched: list[int] = []  # number of embeddings handed to rank_gallery, one entry per call on this rank
_rank_gallery = RetrievalModule.rank_gallery


def _counting_rank_gallery(self, stage, outputs, eval_set):
    searched.append(len(outputs["embedding"]))
    return _rank_gallery(self, stage, outputs, eval_set)


RetrievalModule.rank_gallery = _counting_rank_gallery


@hydra.main(version_base="1.3", config_path="../../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    import torch.distributed as dist

    metrics = run(cfg, "evaluate")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out = Path(cfg.paths.output_dir) / f"rank{rank}.json"
    out.write_text(json.dumps({"rank": rank, "searched": searched, "metrics": metrics}, indent=1))


if __name__ == "__main__":
    main()
