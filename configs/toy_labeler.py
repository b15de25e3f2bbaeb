"""The toy world with a larger toy labeler (a separate, stronger model labels the policy's claims).

python -m rlaifv_jax.main --config configs/toy_labeler.py --workdir runs/toy_labeler
"""
import ml_collections

from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = default.get_config(arg)
    c.labeler.kind = "toy"  # warm-start toy_labeler.* (wider, deeper; yes/no and unbiased captions), label with it
    c.iterations = 4  # the paper's main setting: 4 online iterations
    c.eval.every_epochs = 0.5  # checkpoint selection: the best of each iteration's half-epoch checkpoints
    return c
