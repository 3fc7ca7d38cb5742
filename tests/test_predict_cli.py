"""python -m jaxlm.predict and jaxlm.export as files go: outputs replaced only by complete ones, flags and
inputs checked before the model loads, repaired input reported, no library noise."""

import json
import logging
import os
import subprocess
import sys

from conftest import TEST_XLA_FLAGS

from jaxlm import export, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(capsys, *argv):
  rc = predict.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return rc, captured.err, captured.out


def _one_error(rc, err, message):
  errors = [line for line in err.splitlines() if line.startswith('error: ')]
  assert rc == 2 and len(errors) == 1 and message in errors[0], err
  assert 'Traceback' not in err


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_output_is_replaced_only_by_a_complete_run(hf_cls_dir, tmp_path, capsys):
  (tmp_path / 'in.txt').write_text('one\ntwo\n')
  (tmp_path / 'nofield.jsonl').write_text('{"body": "x"}\n')
  (tmp_path / 'empty.txt').write_text('')
  broken = tmp_path / 'broken_model'
  (broken / 'params').mkdir(parents=True)
  (broken / 'model_config.json').write_text('{"hidden_size": ')
  out = tmp_path / 'out.jsonl'
  old = '{"from": "an earlier run"}\n'
  out.write_text(old)
  files = sorted(os.listdir(tmp_path))
  run = ('--checkpoint', hf_cls_dir, '--output', out)
  rc, err, _ = _run(capsys, *run, '--input', tmp_path / 'nofield.jsonl')
  _one_error(rc, err, "nofield.jsonl:1: no field 'text'")
  rc, err, _ = _run(capsys, *run, '--input', tmp_path / 'in.txt', '--mode', 'fill-mask')  # After the model loaded.
  _one_error(rc, err, '--mode fill-mask needs an MLM head')
  try:  # A model that cannot be read, whatever it raises.
    rc = predict.main(['--checkpoint', str(broken), '--input', str(tmp_path / 'in.txt'), '--output', str(out)])
  except Exception:
    rc = None
  assert rc != 0
  assert out.read_text() == old and sorted(os.listdir(tmp_path)) == files  # No temporary file left either.

  # Through a symlink, the file it points to is replaced; the link stays.
  link = tmp_path / 'link.jsonl'
  link.symlink_to(out)
  rc, err, _ = _run(capsys, '--checkpoint', hf_cls_dir, '--output', link, '--input', tmp_path / 'in.txt')
  assert rc == 0, err
  assert link.is_symlink() and [set(r) for r in _lines(out)] == [{'label', 'probabilities'}] * 2
  # An empty input gives an empty output, once the run succeeded.
  rc, err, _ = _run(capsys, *run, '--input', tmp_path / 'empty.txt')
  assert rc == 0 and out.read_text() == '', err
  rc, err, stdout = _run(capsys, '--checkpoint', hf_cls_dir, '--output', '-', '--input', tmp_path / 'in.txt')
  assert rc == 0 and len([json.loads(line) for line in stdout.splitlines()]) == 2, err


def test_flags_input_and_output_are_checked_before_the_model_loads(hf_cls_dir, tmp_path, capsys, monkeypatch):
  src = tmp_path / 'in.txt'
  src.write_text('one\ntwo\n')
  (tmp_path / 'nofield.jsonl').write_text('{"body": "x"}\n')
  (tmp_path / 'link.txt').symlink_to(src)
  os.link(src, tmp_path / 'hard.txt')
  (tmp_path / 'adir').mkdir()
  monkeypatch.chdir(tmp_path)
  nomodel = tmp_path / 'no_model_here'  # Never reached: each case stops before the model is loaded.
  cases = [
    (['--input', src, '--output', src], f'--output {src}: is the input file'),
    (['--input', src, '--output', 'link.txt'], '--output link.txt: is the input file'),
    (['--input', 'in.txt', '--output', f'../{tmp_path.name}/in.txt'], 'is the input file'),
    (['--input', src, '--output', 'hard.txt'], '--output hard.txt: is the input file'),
    (['--input', src, '--output', 'adir'], '--output adir: is a directory'),
    (['--input', src, '--output', 'in.txt/out.jsonl'], '--output in.txt/out.jsonl: cannot be written'),
    (['--input', 'nofield.jsonl', '--output', 'o.jsonl'], "nofield.jsonl:1: no field 'text' (fields: 'body')"),
    (['--input', src, '--output', 'o.jsonl', '--top_k', '0', '--mode', 'fill-mask'], '--top_k=0: must be at least 1'),
    (['--input', src, '--output', 'o.jsonl', '--max_length', '0'], '--max_length=0: must be at least 1'),
    (['--input', src, '--output', 'o.jsonl', '--batch_size', '-1'], '--batch_size=-1: must be at least 1'),
  ]
  for argv, message in cases:
    rc, err, _ = _run(capsys, '--checkpoint', nomodel, *argv)
    _one_error(rc, err, message)
  assert src.read_text() == 'one\ntwo\n'
  assert sorted(os.listdir(tmp_path)) == ['adir', 'hard.txt', 'in.txt', 'link.txt', 'nofield.jsonl']


def test_undecodable_bytes_and_quoted_fields_over_lines_warn(hf_cls_dir, tmp_path, capsys):
  src = tmp_path / 'bytes.txt'
  src.write_bytes(b'caf\xe9 au lait\nplain\n\xff\xfe also bad\n')
  rc, err, _ = _run(capsys, '--checkpoint', hf_cls_dir, '--input', src, '--output', tmp_path / 'o.jsonl')
  assert rc == 0, err
  assert len(_lines(tmp_path / 'o.jsonl')) == 3
  warnings = [line for line in err.splitlines() if 'warning: ' in line]
  assert warnings == ['warning: 2 input(s) had undecodable bytes (replaced by U+FFFD)'], err
  assert next(predict.read_inputs(str(src), 'txt')) == (1, 'caf\ufffd au lait')
  # Line numbers stay those of the file around a bad line.
  (tmp_path / 'bytes.jsonl').write_bytes(b'{"text": "ok"}\n{"text": "\xe9"}\n\n{"body": 1}\n')
  rc, err, _ = _run(
    capsys, '--checkpoint', hf_cls_dir, '--input', tmp_path / 'bytes.jsonl', '--output', tmp_path / 'o2.jsonl'
  )
  _one_error(rc, err, "bytes.jsonl:4: no field 'text'")
  assert 'warning: 1 input(s) had undecodable bytes' in err

  # Row 2 (line 3) opens a quote it never closes: the csv module joins the rows after it into it.
  src = tmp_path / 'q.csv'
  src.write_bytes(b'text,label\nfine,1\n"broken \xff,2\nthree,3\nfour,4\n"ok",5\nsix,6\n')
  out = tmp_path / 'q.jsonl'
  rc, err, _ = _run(capsys, '--checkpoint', hf_cls_dir, '--input', src, '--output', out)
  assert rc == 0, err
  warnings = [line[line.index('warning: ') :] for line in err.splitlines() if 'warning: ' in line]
  assert warnings == [
    f"warning: {src}:3: the quoted field 'text' runs over 4 lines (an unterminated quote?)",
    'warning: 1 input(s) had undecodable bytes (replaced by U+FFFD)',
  ], err
  assert len(_lines(out)) == 3
  assert [n for n, _ in predict.read_inputs(str(src), 'csv')] == [2, 3, 7]


def test_export_out_is_checked_and_replaced_whole(hf_cls_dir, hf_mlm_dir, tmp_path, capsys):
  afile = tmp_path / 'afile'
  afile.write_text('keep')
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  cases = [
    (afile, f'--out {afile}: exists and is not a directory'),
    (afile / 'sub', 'afile is a file)'),
    (tmp_path / 'mine', 'a non-empty directory that is not an earlier export'),
    (hf_cls_dir, 'is the --checkpoint'),
  ]
  for out, message in cases:
    rc = export.main(['--checkpoint', hf_cls_dir, '--out', str(out)])
    _one_error(rc, capsys.readouterr().err, message)
  assert afile.read_text() == 'keep' and os.listdir(tmp_path / 'mine') == ['notes.txt']

  out = tmp_path / 'model'
  assert export.main(['--checkpoint', hf_cls_dir, '--out', str(out)]) == 0
  assert 'labels.json' in os.listdir(out)
  before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
  assert export.main(['--checkpoint', str(tmp_path / 'nothing'), '--out', str(out)]) == 2
  assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before
  # A new export replaces the earlier one whole: nothing of the classifier's (its labels) is left.
  assert export.main(['--checkpoint', hf_mlm_dir, '--out', str(out)]) == 0
  assert 'params' in os.listdir(out) and 'labels.json' not in os.listdir(out)
  assert export.main(['--checkpoint', hf_mlm_dir, '--out', str(out), '--format', 'hf']) == 0
  assert 'params' not in os.listdir(out) and 'model.safetensors' in os.listdir(out)
  assert sorted(os.listdir(tmp_path)) == ['afile', 'mine', 'model']  # No temporary or set-aside directory left.


def test_a_training_run_is_read_without_orbax_noise(minilm_finetune_run, tmp_path, caplog):
  workdir = str(minilm_finetune_run[0])
  (tmp_path / 'in.txt').write_text('what a great movie!\nthe meal was awful.\n')
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': TEST_XLA_FLAGS}
  args = ['--checkpoint', workdir, '--input', str(tmp_path / 'in.txt'), '--output', str(tmp_path / 'o.jsonl')]
  res = subprocess.run([sys.executable, '-m', 'jaxlm.predict', *args], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=300)  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  assert [set(r) for r in _lines(tmp_path / 'o.jsonl')] == [{'label', 'probabilities'}] * 2
  assert 'Metadata file does not exist' not in res.stderr and 'Traceback' not in res.stderr, res.stderr[-3000:]
  with caplog.at_level(logging.WARNING):
    assert export.main(['--checkpoint', workdir, '--out', str(tmp_path / 'export')]) == 0
  assert 'Metadata file does not exist' not in caplog.text
