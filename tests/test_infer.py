"""python -m jaxlm.predict: formats, modes, streaming, one-line errors; the light import path."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

import jaxlm
from jaxlm import inference, model, predict
from jaxlm.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jsonl(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return str(path)


def _read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _run(capsys, *argv):
  rc = predict.main([str(a) for a in argv])
  err = capsys.readouterr().err
  return rc, err


def _eval_texts(finetuned_cls_dir, n):
  rows = _read(os.path.join(finetuned_cls_dir, 'eval.jsonl'))
  return [r['text'] for r in rows[:: max(1, len(rows) // n)]][:n]


def test_classify_jsonl_streams_in_input_order(finetuned_cls_dir, tmp_path, capsys):
  texts = _eval_texts(finetuned_cls_dir, 45)
  src = _jsonl(tmp_path / 'in.jsonl', [{'id': i, 'text': t} for i, t in enumerate(texts)])
  out = tmp_path / 'out.jsonl'
  rc, err = _run(capsys, '--checkpoint', finetuned_cls_dir, '--input', src, '--output', out, '--batch_size', 4)
  assert rc == 0, err
  got = _read(out)
  ref = jaxlm.load(finetuned_cls_dir).predict(texts)
  assert [r['label'] for r in got] == [r['label'] for r in ref]
  for g, r in zip(got, ref):
    assert set(g) == {'label', 'probabilities'} and set(g['probabilities']) == {'negative', 'positive'}
    assert abs(g['probabilities']['positive'] - r['probabilities']['positive']) < 1e-5
  assert '45/45' in err and 'examples/s' in err.strip().splitlines()[-1]


def test_text_csv_tsv_and_pairs(hf_cls_dir, tmp_path, capsys):
  m = jaxlm.load(hf_cls_dir)
  singles = ['first line', 'a second, longer line with a comma', '', 'last']
  (tmp_path / 'in.txt').write_text('\n'.join(singles) + '\n')
  pairs = [('Is it raining?', 'The sky is clear.'), ('Short.', 'A much longer second segment, with "quotes".')]
  for name, delim in (('in.csv', ','), ('in.tsv', '\t')):
    with open(tmp_path / name, 'w', newline='') as f:
      w = csv.writer(f, delimiter=delim)
      w.writerow(['premise', 'hypothesis', 'other'])
      w.writerows([(a, b, 'x') for a, b in pairs])
  rc, err = _run(capsys, '--checkpoint', hf_cls_dir, '--input', tmp_path / 'in.txt', '--output', tmp_path / 't.jsonl')
  assert rc == 0, err
  assert [r['label'] for r in _read(tmp_path / 't.jsonl')] == [r['label'] for r in m.predict(singles)]
  ref = m.predict(pairs)
  for name in ('in.csv', 'in.tsv'):
    out = tmp_path / f'{name}.jsonl'
    rc, err = _run(capsys, '--checkpoint', hf_cls_dir, '--input', tmp_path / name, '--output', out,
                   '--text_field', 'premise', '--text_pair_field', 'hypothesis')  # fmt: skip
    assert rc == 0, err
    got = _read(out)
    np.testing.assert_allclose([g['probabilities']['neutral'] for g in got],
                               [r['probabilities']['neutral'] for r in ref], atol=1e-5)  # fmt: skip
  # --format overrides the extension.
  (tmp_path / 'in.data').write_text('one\ntwo\n')
  rc, err = _run(capsys, '--checkpoint', hf_cls_dir, '--input', tmp_path / 'in.data', '--output', tmp_path / 'd.jsonl',
                 '--format', 'txt')  # fmt: skip
  assert rc == 0 and len(_read(tmp_path / 'd.jsonl')) == 2


def test_fill_mask_and_embed_modes(hf_mlm_dir, minilm_dir, tmp_path, capsys):
  texts = ['The capital of France is [MASK].', '[MASK] is a [MASK].']
  src = _jsonl(tmp_path / 'in.jsonl', [{'text': t} for t in texts])
  out = tmp_path / 'fm.jsonl'
  rc, err = _run(capsys, '--checkpoint', hf_mlm_dir, '--input', src, '--output', out, '--mode', 'fill-mask',
                 '--top_k', 3)  # fmt: skip
  assert rc == 0, err
  got = _read(out)
  assert [len(g['masks']) for g in got] == [1, 2] and all(len(m) == 3 for g in got for m in g['masks'])
  m = jaxlm.load(hf_mlm_dir)
  ref = m.fill_mask(texts[0], top_k=3)
  with pytest.raises(UsageError, match='top_k=0: must be a positive integer'):
    m.fill_mask(texts[0], top_k=0)
  assert [x['token'] for x in got[0]['masks'][0]] == [x['token'] for x in ref]
  assert abs(got[0]['masks'][0][0]['score'] - ref[0]['score']) < 1e-6
  out = tmp_path / 'emb.jsonl'
  plain = ['a sentence about cats', 'another one, about the weather in spring', 'x']
  (tmp_path / 'e.txt').write_text('\n'.join(plain) + '\n')
  for pooling in ('mean', 'cls'):
    rc, err = _run(capsys, '--checkpoint', minilm_dir, '--input', tmp_path / 'e.txt', '--output', out, '--mode', 'embed',
                   '--pooling', pooling, '--normalize')  # fmt: skip
    assert rc == 0, err
    vecs = np.array([r['embedding'] for r in _read(out)])
    ref = jaxlm.load(minilm_dir).embed(plain, pooling=pooling, normalize=True)
    assert vecs.shape == (3, 384) and np.abs(vecs - ref).max() < 1e-6


def test_bad_input_is_one_line_and_exit_2(hf_mlm_dir, minilm_dir, tmp_path, capsys):
  good = _jsonl(tmp_path / 'good.jsonl', [{'text': 'a [MASK] b'}])
  cases = [
    (['--checkpoint', minilm_dir, '--input', tmp_path / 'nope.jsonl'], 'nope.jsonl: no such file'),
    (['--checkpoint', tmp_path / 'nomodel', '--input', good], 'nomodel: no such file or directory'),
    (['--checkpoint', minilm_dir, '--input', good], '--mode classify needs a classifier head'),
    (['--checkpoint', minilm_dir, '--input', good, '--mode', 'fill-mask'], '--mode fill-mask needs an MLM head'),
    (['--checkpoint', minilm_dir, '--input', tmp_path / 'in.xml', '--mode', 'embed'], 'pass --format'),
  ]
  (tmp_path / 'in.xml').write_text('x')
  rows = [{'text': 'fine [MASK]'}, {'text': 'also [MASK]'}, {}, {'text': 'never read'}]
  (tmp_path / 'gap.jsonl').write_text(json.dumps(rows[0]) + '\n\n' + '\n'.join(map(json.dumps, rows[1:])) + '\n')
  cases.append((['--checkpoint', hf_mlm_dir, '--input', tmp_path / 'gap.jsonl', '--mode', 'fill-mask'],
                "gap.jsonl:4: no field 'text'"))  # fmt: skip
  cases.append((['--checkpoint', hf_mlm_dir, '--input', tmp_path / 'gap.jsonl', '--mode', 'fill-mask',
                 '--text_field', 'body'], "gap.jsonl:1: no field 'body' (fields: 'text')"))  # fmt: skip
  nomask = _jsonl(tmp_path / 'nomask.jsonl', [{'text': 'a [MASK]'}, {'text': 'nothing to fill'}])
  cases.append((['--checkpoint', hf_mlm_dir, '--input', nomask, '--mode', 'fill-mask'],
                'nomask.jsonl:2: no [MASK] in the text'))  # fmt: skip
  (tmp_path / 'broken.jsonl').write_text('{"text": "ok"}\n{"text": \n')
  cases.append((['--checkpoint', minilm_dir, '--input', tmp_path / 'broken.jsonl', '--mode', 'embed'],
                'broken.jsonl:2: not valid JSON'))  # fmt: skip
  (tmp_path / 'cols.csv').write_text('a,b\n1,2\n')
  cases.append((['--checkpoint', minilm_dir, '--input', tmp_path / 'cols.csv', '--mode', 'embed'],
                "cols.csv: no column 'text' (columns: 'a', 'b')"))  # fmt: skip
  for argv, message in cases:
    rc, err = _run(capsys, *argv, '--output', tmp_path / 'out.jsonl')
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert rc == 2 and len(errors) == 1 and message in errors[0], (argv, err)
    assert 'Traceback' not in err


def test_a_run_that_stops_leaves_the_output_as_it_was(hf_cls_dir, tmp_path, capsys):
  # A bad line far into the file: windows before it were already predicted and written, to the
  # temporary file, which is removed; the old output stays whole.
  rows = [{'text': f'example number {i}'} for i in range(300)] + [{'wrong': 1}]
  src = _jsonl(tmp_path / 'in.jsonl', rows)
  out = tmp_path / 'out.jsonl'
  out.write_text('{"old": 1}\n')
  rc, err = _run(capsys, '--checkpoint', hf_cls_dir, '--input', src, '--output', out, '--batch_size', 4)
  assert rc == 2 and 'in.jsonl:301' in err
  assert out.read_text() == '{"old": 1}\n' and sorted(os.listdir(tmp_path)) == ['in.jsonl', 'out.jsonl']
  reader = predict.read_inputs(src, 'jsonl')
  assert next(reader) == (1, 'example number 0')  # A generator: nothing read past what is asked.


def test_batches_bucket_length_and_batch_size(hf_cls_dir):
  m = jaxlm.load(hf_cls_dir, batch_size=16)
  shapes = {n: [ids.shape for ids, *_ in m._batches(['word ' * (n % 7)] * n)] for n in (1, 3, 5, 16, 17, 40)}
  assert shapes == {1: [(1, 16)], 3: [(4, 16)], 5: [(8, 16)], 16: [(16, 16)], 17: [(16, 16), (1, 16)],
                    40: [(16, 16), (16, 16), (8, 16)]}  # fmt: skip
  assert {ids.shape[1] for ids, *_ in m._batches(['word ' * 20, 'word ' * 40, 'word ' * 100])} == {128}


@pytest.mark.parametrize('quantize', [None, 'int8'])
def test_the_fast_inference_path_equals_the_full_forward(hf_cls_dir, quantize):
  # load() scans the layers, computes the last one for [CLS] alone when classifying, and compiles later
  # shapes while earlier batches run: the logits are the full unrolled forward's, for ragged inputs.
  texts = ['word ' * n for n in (3, 40, 1, 17, 90, 5, 33)]
  fast = jaxlm.load(hf_cls_dir, batch_size=2, quantize=quantize)
  full = jaxlm.load(hf_cls_dir, batch_size=2, quantize=quantize, scan_layers=False)
  assert fast.config.scanned and not full.config.scanned
  got = np.array([p['logits'] for p in fast.predict(texts, return_logits=True)])
  want = np.concatenate([np.asarray(model.apply(full.graphdef, full.params, ids, mask, types)['logits'])[:n]
                         for ids, mask, types, n in full._batches(texts)])  # fmt: skip
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The [CLS]-only model output: one position of `hidden`, no MLM logits, the same pooled vector.
  ids, mask, types, _ = next(fast._batches(texts[4:5]))
  one = model.apply(fast.graphdef, fast.params, ids, mask, types, first_token_only=True)
  every = model.apply(fast.graphdef, fast.params, ids, mask, types)
  assert one['hidden'].shape[1] == 1 and every['hidden'].shape[1] == ids.shape[1]
  np.testing.assert_allclose(one['pooled'], every['pooled'], atol=1e-5)


def test_default_dtype_per_platform(monkeypatch):
  assert inference.default_dtype() == 'float32'  # CPU.
  for backend, dtype in (('tpu', 'bfloat16'), ('gpu', 'bfloat16'), ('cpu', 'float32')):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert inference.default_dtype() == dtype


_LIGHT = """
import json, sys
import jaxlm
from jaxlm import predict
m = jaxlm.load(sys.argv[1])
assert m.predict(['a text'])[0]['label']
assert m.embed(['a text']).shape[0] == 1
assert predict.main(['--checkpoint', sys.argv[1], '--input', sys.argv[2], '--output', sys.argv[3]]) == 0
print(json.dumps(sorted(sys.modules)))
"""


def test_inference_imports_no_tensorflow_nor_training_code(hf_cls_dir, tmp_path):
  (tmp_path / 'in.txt').write_text('one\ntwo\n')
  env = {**os.environ, 'PYTHONPATH': ROOT, 'XLA_FLAGS': TEST_XLA_FLAGS}
  res = subprocess.run([sys.executable, '-c', _LIGHT, hf_cls_dir, str(tmp_path / 'in.txt'), str(tmp_path / 'o.jsonl')],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
  assert res.returncode == 0, res.stderr[-3000:]
  modules = set(json.loads(res.stdout.strip().splitlines()[-1]))
  assert 'jaxlm.predict' in modules and 'jaxlm.inference' in modules
  for heavy in (
    'tensorflow',
    'jaxlm.train',
    'jaxlm.trainer',
    'jaxlm.data',
    'jaxlm.steps',
    'jaxlm.tasks',
    'jaxlm.optim',
    'torch',
    'transformers',
  ):
    assert heavy not in modules, heavy
  # optax itself comes in with flax.nnx (its Optimizer), not from jaxlm.
