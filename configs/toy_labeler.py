"""The toy world with a larger toy labeler (a separate, stronger model labels the policy's claims).

python -m rlaifv_jax.main --config configs/toy_labeler.py --workdir runs/toy_labeler
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(arg)
    c.labeler.kind = "toy"  # warm-start toy_labeler.* (wider, deeper) and label with it
    return c
