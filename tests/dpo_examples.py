"""Encoded DPO pairs for the tiny LLaVA of tiny_hf (train-loop tests and their subprocess worker)."""
import numpy as np


def examples(n=12, length=20) -> list[dict[str, np.ndarray]]:
    """``n`` pairs of ``length`` tokens: an image prompt (4 image tokens), random answers ending in eos."""
    rng = np.random.RandomState(0)
    out = []
    for i in range(n):
        start, n_c, n_r = 9, rng.randint(2, 8), rng.randint(2, 8)
        prompt = [1, 5, 6, *[96] * 4, 7, 8]
        ex = {"pixel_values": rng.randn(3, 28, 28).astype(np.float32), "answer_start": np.int32(start),
              "chosen_len": np.int32(n_c), "rejected_len": np.int32(n_r),
              "ref_chosen_logps": np.float32(-4.0 * n_c + rng.randn()), "ref_rejected_logps": np.float32(-4.0 * n_r)}
        for name, k in (("chosen", n_c), ("rejected", n_r)):
            row = np.zeros(length, np.int32)
            row[: start + k] = prompt + list(rng.randint(10, 90, k - 1)) + [2]
            ex[name + "_tokens"] = row
        out.append(ex)
    return out
