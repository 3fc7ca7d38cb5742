"""WORKDIR/.lock: one run at a time on a workdir.

A second run started on a workdir in use would interleave its checkpoints with the first one's
and write every metrics line twice. The lock file names the holder (host, pid, start time,
command), so the refusal can say who; a lock left by a process that is gone is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import jax

from jaxlm.checkpoint import _everywhere
from jaxlm.errors import UsageError


class WorkdirLock:
  """WORKDIR/.lock for the length of a run (a context manager): a second run on the workdir stops.

  Process 0 creates the file atomically (O_CREAT | O_EXCL) with its host, pid, start time and
  command; the other processes only learn whether it could. A lock whose process is gone (same
  host, no such pid) is taken over with a warning. Remote workdirs (gs://) offer no atomic
  create through epath and are not locked.
  """

  def __init__(self, workdir: str):
    self.workdir = str(workdir)
    self.path = None if '://' in self.workdir else os.path.join(os.path.abspath(self.workdir), '.lock')
    self.held = False

  def __enter__(self):
    problem = self._acquire() if jax.process_index() == 0 and self.path else None
    if not _everywhere(problem is None):
      self.__exit__(None, None, None)
      raise UsageError(problem or f'{self.workdir} is in use by another run (see process 0)')
    return self

  def __exit__(self, *exc) -> None:
    if self.held and (_read_lock(self.path) or {}).get('pid') == os.getpid():  # Still ours: not taken over.
      os.remove(self.path)
    self.held = False

  def _acquire(self) -> str | None:
    """None once the lock is ours, else the one-line reason it is not."""
    try:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
    except OSError as e:
      return f'{self.workdir}: cannot create the workdir ({e.strerror})'
    me = {'host': socket.gethostname(), 'pid': os.getpid(), 'since': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
          'command': ' '.join(sys.argv)}  # fmt: skip
    for _ in range(3):  # Twice at most: a stale lock is moved away once, then created again.
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = _read_lock(self.path)
        if holder is None:
          return f'{self.path} exists but cannot be read; if no run uses {self.workdir}, delete it'
        if not _gone(holder):
          return (
            f'{self.workdir} is in use by pid {holder.get("pid")} on host {holder.get("host")} since'
            f' {holder.get("since")}; wait for that run or use another --workdir (if it is not running, delete'
            f' {self.path})'
          )
        print(f'warning: {self.path}: pid {holder.get("pid")} on {holder.get("host")} (since {holder.get("since")})'
              ' is no longer running; taking over its lock', file=sys.stderr, flush=True)  # fmt: skip
        stale = f'{self.path}.stale.{os.getpid()}'
        try:
          os.rename(self.path, stale)  # Atomic: of two runs taking over, one moves it, the other finds the new lock.
          os.remove(stale)
        except FileNotFoundError:
          pass
        continue
      except OSError as e:
        return f'{self.path}: cannot create the lock ({e.strerror})'
      with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
      self.held = True
      return None
    return f'{self.path}: cannot take the lock over'


def _read_lock(path: str) -> dict | None:
  """The holder a lock file names, or None when it cannot be read (being written, or not ours to parse)."""
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else None
  except (OSError, ValueError):
    return None


def _gone(holder: dict) -> bool:
  """True when the process a lock names has ended: on this host, and no process has its pid (or it is us)."""
  if holder.get('host') != socket.gethostname() or not isinstance(holder.get('pid'), int):
    return False  # Another host's process cannot be checked from here.
  if holder['pid'] == os.getpid():
    return True  # A lock of an earlier life of this pid (a restarted container): nothing of it runs now.
  try:
    os.kill(holder['pid'], 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False  # Alive, another user's.
  return False
