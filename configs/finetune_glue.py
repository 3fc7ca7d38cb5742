"""Fine-tune a BERT encoder on a GLUE task from TFDS, with the task's standard metrics.

  python -m jaxlm.train --config configs/finetune_glue.py --workdir /tmp/sst2 \
    --config.task_name=sst2 --config.model.init_from=/path/to/hf-bert-or-jaxlm-run

task_name: cola (Matthews), sst2 (accuracy), mrpc and qqp (F1, accuracy), stsb (Pearson,
Spearman; regression), mnli (matched and mismatched accuracy), qnli, rte, wnli (accuracy).
TFDS reads glue/<task> from --config.data.tfds_data_dir (prepare it with `tfds build glue`
where there is internet). Results go to WORKDIR/eval_results.json; the best checkpoint by
the main metric to WORKDIR/checkpoints/best.
"""

from jaxlm.config import finetuning


def get_config():
  c = finetuning()
  c.task_name = 'sst2'  # The GLUE task; sets data.*, the task kind and the metrics.
  c.model.init_from = ''  # Required: a Hugging Face BERT directory or a jaxlm run / export.
  return c
