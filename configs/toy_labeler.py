"""The toy world with a larger toy labeler (a separate, stronger model labels the policy's claims): the
paper's main setting; everything else as configs/default.py (4 iterations, the same DPO).

python -m rlaifv_jax.main --config configs/toy_labeler.py --workdir runs/toy_labeler
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(arg)
    c.labeler.kind = "toy"  # warm-start toy_labeler.* (wider, deeper; yes/no and unbiased captions), label with it
    return c
