"""The run directory's contract, one for `simclic train` and `simclic tune`:
checked (a folder this process can write) before any data are loaded, held
under an exclusive lock for the run's life, and resumed only with the
settings it was started with.

    with RunDirectory(path) as run_dir:   # checks, then locks
        saved = run_dir.read_json("config.json")
        refuse_contradictions(saved, given, run_dir.path)
"""

import datetime
import fcntl
import json
import logging
import os
import sys
from pathlib import Path

from simclic_tf.config import ConfigError, SimCLICConfig, flag
from simclic_tf.faults import RunFinished, atomic_path

logger = logging.getLogger(__name__)


class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock."""


class RunDirectory:
    """A run's folder: created and probed for writing by `check`, locked
    exclusively by `lock` (or `with`) until `release` or the process ends.

    The lock is `fcntl.flock` on `.lock`, which the kernel drops when its
    process ends however it ends, so a lock left by a killed process is
    stale by construction and simply taken over; the file names its holder
    (pid, command, start) for the message a second process gets.
    """

    LOCK_NAME = ".lock"

    def __init__(self, path, flag_name="--run-dir"):
        self.path = str(path)
        self.flag_name = flag_name
        self._lock_fd = None
        self._created = []

    def __enter__(self):
        self.check()
        self.lock()
        return self

    def __exit__(self, *exc_info):
        self.release()

    def file(self, name):
        return os.path.join(self.path, name)

    def check(self):
        """Creates the folder if missing and writes then removes a probe file
        in it: a one-line `ConfigError` naming the flag if either fails.
        `release` removes the folders it created if they are still empty, so
        a refused run leaves the file system as it found it."""
        where = f"{self.flag_name} {self.path}"
        if not self.path:
            raise ConfigError(f"{self.flag_name} is empty; give the path of a folder "
                              "(created if missing)")
        path = Path(self.path).absolute()
        try:
            existing = next(folder for folder in (path, *path.parents) if folder.exists())
        except OSError as error:  # a name too long, say
            raise ConfigError(f"{where} cannot be a folder: {error.strerror}") from None
        if not existing.is_dir():
            what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
            raise ConfigError(f"{where} {what}; give the path of a folder (created if missing)")
        self._created = [folder for folder in (path, *path.parents)
                         if folder != existing and existing in folder.parents]
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            self._remove_created()
            raise ConfigError(f"{where} cannot be written ({error.strerror}); give a folder "
                              "this user can write to") from None

    def _remove_created(self):
        for folder in self._created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote to it
                return
        self._created = []

    def lock(self):
        """Takes the exclusive lock, or raises `RunDirBusy` naming its holder."""
        path = self.file(self.LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:  # a lock file another user left, say
                raise ConfigError(f"{self.flag_name} {self.path}: cannot open its lock file "
                                  f"{path} ({error.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"{self.flag_name} {self.path} is in use by {describe_holder(holder)}; "
                    "wait for it to end, stop it (a resumed run continues from its last "
                    "epoch), or choose another --run-dir") from None
            except OSError as error:  # no locks on this file system (some NFS mounts)
                os.close(fd)
                raise ConfigError(f"{self.flag_name} {self.path} cannot be locked "
                                  f"({error.strerror}); give a folder on a local disk") from None
            # The last holder may have removed the file between our open and
            # flock: then the lock is on a file nobody else will open again.
            if _same_file(fd, path):
                break
            os.close(fd)
        previous = _read_fd(fd)
        if previous.get("pid") and previous["pid"] != os.getpid():
            logger.warning("%s: took over the lock left by process %s (%s), which is no "
                           "longer running", self.path, previous["pid"],
                           previous.get("command", "?"))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv),
                                  "started": _now()}).encode(), 0)
        self._lock_fd = fd

    def release(self):
        """Removes the lock file, then drops the lock (the order `lock` relies
        on), and the folders `check` created if nothing was written to them."""
        if self._lock_fd is not None:
            try:
                os.remove(self.file(self.LOCK_NAME))
            except FileNotFoundError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        self._remove_created()

    def read_json(self, name):
        """The JSON file `name` in the folder, or None when it does not exist."""
        try:
            with open(self.file(name)) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"{self.flag_name} {self.path}: cannot read {name} "
                              f"({error}); start a new {self.flag_name}") from None

    def write_json(self, name, values):
        """Writes `values` to the file `name` whole or not at all."""
        with atomic_path(self.file(name)) as partial, open(partial, "w") as f:
            json.dump(values, f, indent=2, sort_keys=True)


def training_config(run_dir, config, resume, given):
    """The config to train in the locked `run_dir`: `config`, or on resume
    the one saved there. Refuses to start over a run that was not asked to
    resume, a resume of nothing, a resume whose `given` knobs ({name: value},
    from the command line) contradict the saved ones, and then, with
    `RunFinished`, a resume of a run that has ended. Writes nothing."""
    path = run_dir.file("config.json")
    if not resume:
        if os.path.exists(path):
            raise ConfigError(f"--run-dir {run_dir.path} already holds a run; pass --resume "
                              "to continue it, or choose another --run-dir")
        return config
    if not os.path.exists(path):
        raise ConfigError(f"--resume: {path} does not exist; --run-dir must name the "
                          "directory of the run to continue")
    saved = SimCLICConfig.load(path, source="--resume").replace(run_dir=config.run_dir)
    refuse_contradictions(saved.to_dict(), {name: value for name, value in given.items()
                                            if name != "run_dir"}, run_dir.path)
    report = run_dir.read_json("report.json")
    if report is not None:
        raise RunFinished(run_dir.path, report.get("diverged"))
    return saved


def start_training(run_dir, config, derived, summary, total_steps):
    """Writes the run's config.json and data.json (the data's `summary`,
    which a resume must match), after saying which knobs were derived from
    the run's length of `total_steps` steps."""
    for name, value in derived.items():
        logger.warning("%s %s, derived from the run's length (%d steps); give the flag to "
                       "override", flag(name), value, total_steps)
    run_dir.write_json("data.json", summary)
    run_dir.write_json("config.json", config.to_dict())


def check_same_data(run_dir, summary):
    """On resume: refuses data that differ from those the run started with
    (data.json), whose history buffer would not fit the checkpoint."""
    saved = run_dir.read_json("data.json")
    if saved is None:
        return
    differing = [f"{key} {summary[key]} (saved: {saved.get(key)})" for key in sorted(summary)
                 if saved.get(key) != summary[key]]
    if differing:
        raise ConfigError(
            f"--resume: the data differ from those the run in {run_dir.path} started with: "
            f"{'; '.join(differing)}; restore them, or start a new --run-dir")


def resumed_epoch(run_dir):
    """The epoch a resumed fit starts at: the one BackupAndRestore wrote in
    its backup's training_metadata.json (0 when there is none), read before
    fit so that the data can start there too."""
    metadata = run_dir.read_json(os.path.join("backup", "training_metadata.json"))
    return int(metadata["epoch"]) if metadata else 0


def describe_holder(holder):
    """'process 123 (simclic train ..., started 2026-12-05 07:40:00)'."""
    if not holder.get("pid"):
        return "another process (it has not written its pid yet)"
    return (f"process {holder['pid']} ({holder.get('command', '?')}, started "
            f"{holder.get('started', '?')})")


def contradictions(saved, given):
    """'--flag value (saved: value)' for each of the `given` settings
    ({name: value}, from the command line; None = not given) that differs
    from the `saved` ones: the one resume comparison of train and tune."""
    return [f"{flag(name)} {_spelled(value)} (saved: {_spelled(saved.get(name))})"
            for name, value in sorted(given.items())
            if value is not None and _comparable(value) != _comparable(saved.get(name))]


def refuse_contradictions(saved, given, path, what="run", remedy=None):
    """Raises a `ConfigError` naming every flag in `given` that contradicts
    `saved`, and what to do instead (`remedy` too, when given)."""
    differing = contradictions(saved, given)
    if differing:
        raise ConfigError(
            f"--run-dir {path} holds a {what} with other settings, and these flags "
            f"contradict it: {'; '.join(differing)}. Drop them to continue it as saved"
            f"{', ' + remedy if remedy else ''}, or choose another --run-dir")


def _comparable(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def _spelled(value):
    return " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value


def _read_fd(fd):
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}


def _same_file(fd, path):
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _now():
    return datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
