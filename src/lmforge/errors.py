"""The exceptions the CLI turns into one line: `UserError` for mistakes a user can fix (bad option, missing
file, bad data; exit status 2) and `TrainingInterrupted` for a run stopped by a signal (128 + the signal).
Library callers can catch them.
"""

from __future__ import annotations

import signal
from pathlib import Path


class UserError(ValueError):
    """A problem in the user's input, with a message that names the value and the fix."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after a step; a checkpoint of that step was written (if out_dir)."""

    def __init__(self, signal_number: int, step: int, checkpoint: Path | None) -> None:
        self.signal_number, self.step, self.checkpoint = signal_number, step, checkpoint
        name = signal.Signals(signal_number).name
        where = (f"checkpoint saved in {checkpoint}; rerun the same command with --resume to continue"
                 if checkpoint else "nothing was saved (no output folder)")
        super().__init__(f"{name} at step {step}: {where}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number  # what shells report for a process a signal stopped: 130 for Ctrl-C
