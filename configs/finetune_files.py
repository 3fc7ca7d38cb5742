"""Fine-tune a BERT encoder on your own JSONL / CSV / TSV / Parquet files or a saved Hugging Face dataset: texts
or text pairs with a label.

  python -m jaxlm.train --config configs/finetune_files.py --workdir /tmp/ft \
    --config.model.init_from=/path/to/hf-bert-or-jaxlm-run \
    --config.data.train=jsonl:train.jsonl --config.data.eval=jsonl:dev.jsonl

Labels may be strings or integers: the label set is read from the training file and saved
with the checkpoint (WORKDIR/labels.json). For a float target use --config.task=regression.
Name the fields with data.text_field, data.text_pair_field and data.label_field.
"""

from jaxlm.config import finetuning


def get_config():
  c = finetuning()
  c.task = 'classification'  # Or 'regression' (a float label, squared-error loss, Pearson).
  c.model.init_from = ''  # Required: a Hugging Face BERT directory or a jaxlm run / export.
  c.data.train = ''  # Required: jsonl:GLOB, csv:GLOB, tsv:GLOB, parquet:GLOB or hf:PATH of training examples.
  c.data.eval = ''  # The same form; '' = no evaluation.
  c.data.text_field = 'text'  # The text (or the first text of a pair).
  c.data.text_pair_field = ''  # The second text of a pair ('' = single texts).
  c.data.label_field = 'label'  # The label: a class name / id, or a float for regression.
  return c
