"""The CLIs' one-time re-execution with glibc's huge-page tunable (jaxlm/hostenv.py)."""

import os
import subprocess
import sys

from jaxlm import hostenv

PROBE = (
  'import os, sys; from jaxlm import hostenv; hostenv.reexec_with_hugepages(); '
  'print(repr(os.environ.get("GLIBC_TUNABLES")), sys.argv[1:])'
)


def _probe(env):
  out = subprocess.run(
    [sys.executable, '-c', PROBE, 'a', '--b=1'], env=env, capture_output=True, text=True, check=True
  ).stdout.strip()
  return out


def test_tunable_is_added_once_and_kept_with_others():
  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostenv.OPT_OUT)}
  env = hostenv.hugepage_env(base, thp_mode='madvise')
  if hostenv._glibc_version() is None or hostenv._glibc_version() < (2, 35) or not sys.platform.startswith('linux'):
    assert env is None
    return
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  assert hostenv.hugepage_env(env, thp_mode='madvise') is None  # Already there: no second re-exec.
  mixed = hostenv.hugepage_env({**base, 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, thp_mode='madvise')
  assert mixed['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert hostenv.hugepage_env(base, thp_mode='always') is None  # The kernel gives huge pages anyway.
  assert hostenv.hugepage_env(base, thp_mode='never') is None
  assert hostenv.hugepage_env({**base, hostenv.OPT_OUT: '0'}, thp_mode='madvise') is None


def test_reexec_keeps_the_arguments_and_honours_the_opt_out():
  base = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hostenv.OPT_OUT)}
  expected = "'glibc.malloc.hugetlb=1'" if hostenv.hugepage_env(base) is not None else 'None'
  assert _probe(base) == f"{expected} ['a', '--b=1']"
  assert _probe({**base, hostenv.OPT_OUT: '0'}) == "None ['a', '--b=1']"


def test_thp_mode_parsing(tmp_path):
  f = tmp_path / 'enabled'
  f.write_text('always [madvise] never\n')
  assert hostenv._thp_mode(str(f)) == 'madvise'
  f.write_text('[always] madvise never\n')
  assert hostenv._thp_mode(str(f)) == 'always'
  assert hostenv._thp_mode(str(tmp_path / 'missing')) is None


def test_the_compilation_cache_env_defaults_moves_and_switches_off(tmp_path):
  env = {'HOME': str(tmp_path)}
  assert hostenv.compilation_cache_env(env) == str(tmp_path / '.cache' / 'jaxlm' / 'xla')
  assert env['JAX_COMPILATION_CACHE_DIR'] == str(tmp_path / '.cache' / 'jaxlm' / 'xla')
  env = {'XDG_CACHE_HOME': str(tmp_path / 'x'), hostenv.CACHE_ENV: str(tmp_path / 'mine')}
  assert hostenv.compilation_cache_env(env) == str(tmp_path / 'mine')
  env = {hostenv.CACHE_ENV: '0'}
  assert hostenv.compilation_cache_env(env) is None and env['JAX_ENABLE_COMPILATION_CACHE'] == 'false'
  env = {'JAX_COMPILATION_CACHE_DIR': '/theirs'}  # JAX's own setting wins.
  assert hostenv.compilation_cache_env(env) is None and env['JAX_COMPILATION_CACHE_DIR'] == '/theirs'


def test_a_second_predict_loads_its_programs_from_the_cache(hf_cls_dir, tmp_path):
  (tmp_path / 'in.txt').write_text('a short one\n' + 'a much longer sentence that needs more tokens than that\n' * 3)
  base = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def predict(cache: str) -> set[str]:
    env = {**base, hostenv.CACHE_ENV: cache, 'PYTHONPATH': root}
    argv = [
      '-m',
      'jaxlm.predict',
      '--checkpoint',
      hf_cls_dir,
      '--input',
      tmp_path / 'in.txt',
      '--output',
      tmp_path / 'o.jsonl',
    ]
    res = subprocess.run([sys.executable, *map(str, argv)], env=env, cwd=root, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    return {p.name for p in (tmp_path / 'cache').glob('*-cache')}

  first = predict(str(tmp_path / 'cache'))
  assert len(first) >= 2  # A program per length bucket, at least.
  assert predict(str(tmp_path / 'cache')) == first  # Nothing compiled anew.
  (tmp_path / 'cache').rename(tmp_path / 'kept')
  assert predict('0') == set() and not (tmp_path / 'cache').exists()
