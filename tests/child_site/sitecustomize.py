"""Run at start-up by the processes the tests start (``smoke_runs.child_env`` puts this directory
first on their path), so that they run as a user's installation does: without torch.

A run never uses torch (it is in the test extra only, as the tests' reference), but ``transformers``
imports it whenever it is installed (``modeling_rope_utils``): 2.9 s of a smoke run's 10 s of
imports on this project's 2-core machine (BENCHMARKS.md). A ``None`` entry in ``sys.modules`` makes
``importlib.util.find_spec("torch")`` return ``None`` (transformers: torch not available) and
``import torch`` raise ImportError."""
import sys

sys.modules.setdefault("torch", None)
