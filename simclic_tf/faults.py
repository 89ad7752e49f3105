"""What ends a run early, each with the one line a user needs, and files
that a kill can never leave half written.

`train.py` turns each exception below into that line (no traceback) and an
exit status: `Diverged` 1, `Interrupted` 128 + the signal's number.
"""

import contextlib
import os
import shlex
import signal
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def resume_command(run_dir):
    return f"python train.py --run-dir {shlex.quote(str(run_dir))} --resume"


class RunFinished(Exception):
    """`--resume` on a run that has already written its report (`diverged`:
    the report's record of a divergence, if it ended so): nothing to do."""

    def __init__(self, run_dir, diverged=None):
        report = os.path.join(run_dir, "report.md")
        if diverged:
            super().__init__(
                f"{run_dir} ended: it diverged at epoch {diverged['epoch']}, step "
                f"{diverged['step']} ({report}); nothing was changed. Resuming would repeat "
                "it: start a new --run-dir with a lower --base-lr.")
        else:
            super().__init__(
                f"{run_dir} is finished ({report}); nothing was changed. To train longer, "
                "start a new --run-dir with more --epochs.")


class Diverged(Exception):
    """A non-finite loss or weight: training stopped before exporting anything."""

    def __init__(self, config, epoch, step, what):
        self.epoch, self.step, self.what = epoch, step, what
        checkpoint = (f"the last good checkpoint (end of epoch {epoch - 1}) is in "
                      f"{os.path.join(config.run_dir, 'backup')}" if epoch > 1
                      else "there is no good checkpoint (it diverged in the first epoch)")
        super().__init__(
            f"DIVERGED at epoch {epoch}, step {step}: {what} is not finite. Nothing was "
            f"exported; {checkpoint}. Try {divergence_advice(config)}, in a new --run-dir.")


def divergence_advice(config):
    """What to try after a divergence, for a run of `config`."""
    advice = [f"a lower --base-lr (this run: {config.base_lr:g})", "--warmup-epochs 1 or more"]
    if config.precision != "float32":
        advice.append(f"--precision float32 (this run: {config.precision})")
    return ", ".join(advice[:-1]) + " or " + advice[-1]


class Interrupted(Exception):
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption) asked the run to stop.

    Args:
      run_dir: the run's directory, None when nothing was written yet.
      where: "at epoch 3, step 7", say; None outside training.
      completed: epochs the checkpoint holds (0: none yet; None: not known).
    """

    def __init__(self, signum, run_dir=None, where=None, completed=None):
        self.signum = signum
        name = signal.Signals(signum).name
        if run_dir is None:
            super().__init__(f"Interrupted by {name} before anything was written; rerun "
                             "the same command")
            return
        if completed:
            saved = (f"the checkpoint (end of epoch {completed}) is in "
                     f"{os.path.join(run_dir, 'backup')}")
        elif completed == 0:
            saved = f"no epoch had completed, the run's config is in {run_dir}"
        else:
            saved = f"the run so far is in {run_dir}"
        super().__init__(f"Interrupted by {name}: stopped {where or 'outside training'}; "
                         f"{saved}; resume with: {resume_command(run_dir)}")


class StopOnSignal:
    """Within `with`, SIGINT and SIGTERM stop the run cleanly.

    While training (`training` set by the `callbacks.SignalStop` callback)
    the signal is only recorded, and the callback raises `Interrupted` at the
    end of the current step, so the checkpoint of the last epoch is intact;
    elsewhere, or at a second signal, `Interrupted` is raised at once.
    Handlers are installed only in the main thread (Python allows no other).
    """

    def __init__(self):
        self.received = None
        self.training = False
        self.run_dir = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.training and self.received is None:
            self.received = signum
            return
        raise Interrupted(signum, self.run_dir)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@contextlib.contextmanager
def atomic_path(path):
    """A temporary name beside `path` (same suffix, so savers that read it
    still know the format) that becomes `path` only once the block has
    completed: a kill mid-write leaves the old file or none, never a
    truncated one (os.replace is atomic on POSIX and Windows)."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield str(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
