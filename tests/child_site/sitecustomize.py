"""Run at start-up by the processes the tests start (``smoke_runs.child_env`` puts this directory
first on their path), so that they compile and import as the test processes do:

- the test processes' XLA compile options (``xla_options``);
- no torch: a run never uses it (torch is in the test extra only, as the tests' reference), but
  ``transformers`` imports it whenever it is installed (``modeling_rope_utils``), about 6 s a process
  on this project's 2-core machine (BENCHMARKS.md). A ``None`` entry in ``sys.modules`` makes
  ``importlib.util.find_spec("torch")`` return ``None`` (transformers: torch not available) and
  ``import torch`` raise ImportError, as in a user's installation without the test extra."""
import sys

import xla_options

sys.modules.setdefault("torch", None)
xla_options.install()
