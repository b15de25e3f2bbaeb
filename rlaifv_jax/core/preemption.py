"""Stop a training loop cleanly on SIGTERM (how preemptible / spot TPU VMs end) or SIGINT (Ctrl-C).

``with StopSignals() as stop:`` — inside the block the first SIGTERM or SIGINT only sets a flag
(a second one acts as usual: Ctrl-C twice interrupts at once). The loop asks ``stop.requested(step)``
after every step, saves, and raises ``stop.preempted(message)``.

On many hosts the hosts must stop at the same step: JAX's preemption service (started by
``jax.distributed.initialize``) catches SIGTERM on any host and agrees on a step, and
``multihost_utils.reached_preemption_sync_point(step)`` (called by every host at every step) turns
true on all hosts at that step. SIGTERM is then left to JAX's handler; a SIGINT is turned into a
SIGTERM of this process so it goes through the same agreement.
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from jax._src import distributed as jax_distributed  # the preemption service's state (no public getter)
from jax.experimental import multihost_utils

from rlaifv_jax.core.errors import Preempted

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _jax_sync() -> bool:
    """Whether JAX's multi-host preemption service is running (so it owns SIGTERM)."""
    state = jax_distributed.global_state
    return getattr(state, "client", None) is not None and getattr(state, "preemption_sync_manager", None) is not None


class StopSignals:
    """Context manager turning SIGTERM / SIGINT into a stop request checked between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._multi = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._multi = _jax_sync()
        for sig in SIGNALS:
            if self._multi and sig == signal.SIGTERM:
                continue  # JAX's preemption notifier handles it on every host
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once
        log.warning("%s received: finishing the current step, then saving a checkpoint (send it again to "
                    "stop at once)", signal.Signals(signum).name)
        if self._multi:
            os.kill(os.getpid(), signal.SIGTERM)  # let JAX's service agree on the stop step with every host

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step`` (every host gets the same answer at the same step)."""
        if self._multi:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request"

    def preempted(self, message: str) -> Preempted:
        return Preempted(message, self.signum or signal.SIGTERM)
