"""Process settings that jaxlm's command-line programs apply before JAX starts.

XLA's CPU runtime allocates each execution's scratch buffers afresh (758 MiB for the BERT-small
train step that tools/bench.py times), and glibc serves an allocation that large with a new
mmap of 4 KiB pages. Every step then faults in and walks the page tables of that much fresh
memory. With the glibc tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc asks the
kernel for transparent huge pages (2 MiB) on its mappings (madvise), which removes about 190,000
page faults per step of that benchmark and makes the step about 9% faster on the 2-core CPU
machine the README's figures come from.

The tunable is read only when a process starts, so `python -m jaxlm.train` and
`python -m jaxlm.predict` re-execute themselves once, same argv and PID, with it added to
GLIBC_TUNABLES (tools/bench.py starts its jaxlm workers with it). Nothing happens when it is set already, when the kernel's THP mode is
not `madvise` (`always` gives huge pages anyway; `never` cannot), off Linux / glibc, or when
JAXLM_HUGEPAGES=0.

They also keep JAX's persistent compilation cache (`compilation_cache_env`): the programs a run
compiles are written to a directory and a later process that compiles the same program (the same
model, shapes and flags: a second predict over another file, a resumed or repeated run) loads it
instead. The directory is `$XDG_CACHE_HOME/jaxlm/xla` (`~/.cache/jaxlm/xla`), or the path in
JAXLM_COMPILATION_CACHE; JAXLM_COMPILATION_CACHE=0 switches it off, and JAX's own
JAX_COMPILATION_CACHE_DIR, when set, wins. The cache is capped at CACHE_MAX_BYTES (least recently
used entries go first).
"""

from __future__ import annotations

import os
import sys

OPT_OUT = 'JAXLM_HUGEPAGES'  # Set to 0 to leave the allocator alone.
TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'
CACHE_ENV = 'JAXLM_COMPILATION_CACHE'  # A directory, or 0 to switch the compilation cache off.
CACHE_MAX_BYTES = 4 << 30


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()  # 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    return None
  try:
    major, minor = version.split('.')[:2]
    return (int(major), int(minor)) if name == 'glibc' else None
  except ValueError:
    return None


def _thp_mode(path: str = _THP_MODE) -> str | None:
  """The bracketed word of the kernel's THP setting ('always', 'madvise', 'never'), or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1 : end] if 0 <= start < end else None


def hugepage_env(environ=None, thp_mode: str | None = None) -> dict | None:
  """A copy of `environ` with the huge-page tunable added, or None when it should not be added."""
  environ = dict(os.environ if environ is None else environ)
  if environ.get(OPT_OUT, '1') == '0' or not sys.platform.startswith('linux'):
    return None
  version = _glibc_version()
  if version is None or version < (2, 35):
    return None
  if (thp_mode or _thp_mode()) != 'madvise':
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  environ['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
  return environ


def reexec_with_hugepages() -> None:
  """Re-executes this program with the tunable set, once; returns when there is nothing to do."""
  env = hugepage_env()
  argv = getattr(sys, 'orig_argv', None)
  if env is None or not argv or not sys.executable:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError:
    return  # Run on as we are.


def compilation_cache_env(environ=None) -> str | None:
  """Points JAX's persistent compilation cache at jaxlm's cache directory by setting its
  environment variables in `environ` (os.environ) before JAX is imported; returns the directory,
  or None when the cache is off or JAX_COMPILATION_CACHE_DIR chose one already."""
  environ = os.environ if environ is None else environ
  choice = environ.get(CACHE_ENV, '').strip()
  if choice.lower() in ('0', 'off', 'false', 'no'):
    environ['JAX_ENABLE_COMPILATION_CACHE'] = 'false'
    return None
  if environ.get('JAX_COMPILATION_CACHE_DIR'):
    return None
  base = environ.get('XDG_CACHE_HOME') or os.path.join(environ.get('HOME') or os.path.expanduser('~'), '.cache')
  path = os.path.expanduser(choice) if choice else os.path.join(base, 'jaxlm', 'xla')
  environ['JAX_COMPILATION_CACHE_DIR'] = path
  # JAX caches only programs that took a second to compile by default; a CPU forward of a small
  # encoder takes less, and is what a predict run waits for.
  environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
  environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(CACHE_MAX_BYTES))
  return path
