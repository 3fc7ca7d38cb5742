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
"""

from __future__ import annotations

import os
import sys

OPT_OUT = 'JAXLM_HUGEPAGES'  # Set to 0 to leave the allocator alone.
TUNABLE = 'glibc.malloc.hugetlb=1'
_THP_MODE = '/sys/kernel/mm/transparent_hugepage/enabled'


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
