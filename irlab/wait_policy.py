"""OpenMP threads that sleep instead of spinning while they wait: imported by `train.py` and `eval.py` before torch.

Measured on 2 cores (`bench/lightning_overhead.py --model baseline --threads 0`, torch's default threads): one
run alone 103 -> 91 images/s (median of 3 interleaved), two runs at once 13 -> 65 images/s each. Runs share
machines (sweeps, DDP ranks, other users), so sleeping is the default; ``export OMP_WAIT_POLICY=ACTIVE`` takes
back the last ~10% on a machine of your own. It must be set before torch loads its OpenMP runtime.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
