"""Chat templates: a conversation rendered into the prompt text an instruct model was trained on.

What lives here: `read_template(dir)`, the Jinja chat template a Hugging Face tokenizer directory
ships (`chat_template.jinja`, or `chat_template` in tokenizer_config.json: one template, or a list
of named ones of which 'default' is used), and `render(template, conversation, ...)`, which renders
it as transformers' `apply_chat_template` does: a sandboxed Jinja environment with `trim_blocks`,
`lstrip_blocks` and loop controls, the globals `raise_exception` and `strftime_now`, a `tojson`
filter that leaves non-ASCII and HTML characters as they are, and the tokenizer's special tokens
(`bos_token`, `eos_token`, ...) as variables. `assistant_spans` finds
where each assistant message sits in a rendered conversation, for fine-tuning on the assistant's
turns only (data/causal.py). What does not: tokenizing the text (the Tokenizer holds the template;
generate.Generator.chat renders, tokenizes and generates).

A conversation is a list of messages, each a dict with a `role` ('system', 'user', 'assistant', or
whatever the template knows) and a `content` string; other keys are passed to the template as they
are. A template that rejects a conversation (`raise_exception`) is a UsageError with its message.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
from etils import epath
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxlm.errors import UsageError

TEMPLATE_FILE = 'chat_template.jinja'  # transformers' own file for it, beside tokenizer_config.json.


def read_template(directory) -> str | None:
  """The chat template of a tokenizer directory, or None when it has none."""
  p = epath.Path(directory)
  if (p / TEMPLATE_FILE).exists():
    return (p / TEMPLATE_FILE).read_text()
  if not (p / 'tokenizer_config.json').exists():
    return None
  template = json.loads((p / 'tokenizer_config.json').read_text()).get('chat_template')
  if isinstance(template, list):  # Named templates: [{"name": "default", "template": "..."}, ...].
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    if 'default' not in named:
      raise UsageError(f'{p / "tokenizer_config.json"}: chat_template names {sorted(named)} but no "default"')
    template = named['default']
  if template is not None and not isinstance(template, str):
    raise UsageError(f'{p / "tokenizer_config.json"}: chat_template is a {type(template).__name__}, not a string')
  return template


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise UsageError(f'the chat template is not valid Jinja (line {e.lineno}: {e.message})') from None


def check_conversation(conversation, where: str) -> list[dict]:
  """`conversation` as a list of message dicts, or a UsageError naming `where` and the message at fault."""
  if isinstance(conversation, (str, Mapping)) or not isinstance(conversation, Sequence):
    raise UsageError(
      f'{where}: a conversation is a list of {{"role", "content"}} messages, not a {type(conversation).__name__}'
    )
  for i, m in enumerate(conversation):
    if not isinstance(m, Mapping) or not isinstance(m.get('role'), str) or not isinstance(m.get('content'), str):
      raise UsageError(f'{where}, message {i}: expected {{"role": str, "content": str}}, got {m!r:.80}')
  return [dict(m) for m in conversation]


_REASONING = ('reasoning_content', 'thinking', 'reasoning')  # A message's reasoning, by the names templates read.


def _with_reasoning(message: dict) -> dict:
  """`message` with its reasoning (under any of _REASONING) also as `thinking` and `reasoning_content`, as
  transformers passes it, so that a template reading either name finds it."""
  reasoning = next((message[k] for k in _REASONING if message.get(k) is not None), None)
  return message if reasoning is None else {'thinking': reasoning, **message, 'reasoning_content': reasoning}


def render(template: str, conversation: Sequence[Mapping], special_tokens: Mapping[str, str | None] | None = None,
           add_generation_prompt: bool = True, where: str = 'conversation', **variables) -> str:  # fmt: skip
  """The text of `conversation` by `template`; `add_generation_prompt` ends it where the assistant's
  reply begins. `special_tokens` (role -> token: 'bos', 'eos', ...) become `bos_token`, `eos_token`, ...;
  `variables` are more template variables (tools, documents, a template's own switches)."""
  messages = [_with_reasoning(m) for m in check_conversation(conversation, where)]
  tokens = {f'{role}_token': t for role, t in (special_tokens or {}).items() if t is not None}
  variables = {'tools': None, 'documents': None, **tokens, **variables}  # Defined, as transformers defines them.
  try:
    return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise UsageError(f'{where}: the chat template refused it: {e}') from None


def assistant_spans(template: str, conversation: Sequence[Mapping], special_tokens: Mapping[str, str | None] | None = None,
                    where: str = 'conversation') -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
  """The text of the whole conversation, and the [start, end) character span of each assistant message in it:
  what the template writes for that message after the generation prompt before it, its end-of-turn marks
  included. A template whose text of a shorter conversation is not the beginning of the longer one's (one that
  rewrites earlier turns) cannot be cut so, and is a UsageError naming `where`."""
  messages = check_conversation(conversation, where)
  text = render(template, messages, special_tokens, False, where)
  spans = []
  for i, m in enumerate(messages):
    if m['role'] != 'assistant':
      continue
    before = render(template, messages[:i], special_tokens, True, where)
    upto = render(template, messages[: i + 1], special_tokens, False, where)
    if not (upto.startswith(before) and text.startswith(upto)):
      raise UsageError(f'{where}, message {i}: the chat template renders the conversation up to this message'
                       ' otherwise than as the beginning of the whole one, so its assistant turns cannot be told'
                       ' apart for the loss')  # fmt: skip
    if len(upto) > len(before):
      spans.append((len(before), len(upto)))
  return text, spans
