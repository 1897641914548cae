"""Conversations, chat templates and their loss masks; SFT data in JSONL.

A conversation is a list of turns `{'role': 'system'|'user'|'assistant',
'content': str}`. A `ChatTemplate` renders it into token ids and a loss mask
that covers the assistant turns only: their content and their end-of-turn
token, which is what the model must learn to produce (the role headers and
everything the user wrote are context). Text is encoded a turn at a time,
never across a control token, so `parse` recovers the turns exactly.

Two templates:

  simple  <|user|>Hi<|end|><|assistant|>Hello!<|end|>
          control pieces <|system|> <|user|> <|assistant|> <|end|>
  chatml  <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n
          control pieces <|im_start|> <|im_end|> (what imported Llama-family
          checkpoints such as SmolLM2 use)

Control pieces are reserved pieces of the tokenizer (SentencePiece control
symbols: encoding text never produces them), so a user who types
"<|user|>" types text. An LM whose later stages will chat reserves them when
its tokenizer is trained (`data.chat_template` on the pretraining run). The
template a run used is saved beside its tokenizer (`chat_template.json`)
and in its checkpoints, and `generate` renders prompts with it.

JSONL formats read (one object per line; a bad line is a UserError naming
the file and line): `{"messages": [...]}` or `{"prompt": ..., "completion":
...}` (strings, or lists of turns). Human conversations come from the PyPI
package `chitchat-dataset` (`chitchat_*`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Sequence

from data import sources
from data.errors import UserError

ROLES = ('system', 'user', 'assistant')
TEMPLATE_FILE = 'chat_template.json'


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How turns become ids: per role a header, then content, then a footer.

  header: role -> (control piece, text after it); end: the control piece
  that closes a turn; separator: text after it (chatml: a newline).
  """
  name: str
  header: dict[str, tuple[str, str]]
  end: str
  separator: str = ''
  # A system turn put first when a conversation has none (SmolLM2's
  # template does this; ours have none).
  default_system: str = ''

  @property
  def pieces(self) -> tuple[str, ...]:
    """The control pieces the tokenizer must reserve, in a fixed order."""
    out = []
    for piece in [h[0] for h in self.header.values()] + [self.end]:
      if piece not in out:
        out.append(piece)
    return tuple(out)

  def to_json(self) -> dict[str, Any]:
    return {'name': self.name, 'header': {k: list(v) for k, v in
                                          self.header.items()},
            'end': self.end, 'separator': self.separator,
            'default_system': self.default_system}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> 'ChatTemplate':
    return cls(d['name'], {k: tuple(v) for k, v in d['header'].items()},
               d['end'], d.get('separator', ''), d.get('default_system', ''))

  def with_system(self, messages: Sequence[dict]) -> list[dict]:
    """`messages`, with the default system turn first if they start without
    one."""
    messages = list(messages)
    if self.default_system and messages and messages[0].get('role') != 'system':
      return [{'role': 'system', 'content': self.default_system}] + messages
    return messages

  # -- ids ---------------------------------------------------------------------
  def _ids(self, tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_eos=False)) if text else []

  def end_id(self, tokenizer) -> int:
    return piece_id(tokenizer, self.end)

  def _header_ids(self, tokenizer, role: str) -> list[int]:
    piece, text = self.header[role]
    return [piece_id(tokenizer, piece)] + self._ids(tokenizer, text)

  def render(self, tokenizer, messages: Sequence[dict]
             ) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation; the mask is 1 on assistant content
    and the assistant's end-of-turn token."""
    return self.render_batch(tokenizer, [messages])[0]

  def render_batch(self, tokenizer, conversations: Sequence[Sequence[dict]]
                   ) -> list[tuple[list[int], list[int]]]:
    """`render` of many conversations, with one tokenizer call for all text."""
    for messages in conversations:
      check_messages(messages)
    conversations = [self.with_system(c) for c in conversations]
    texts = [m['content'] for c in conversations for m in c]
    encoded = iter(tokenizer.encode(texts, add_eos=False) if texts else [])
    end = self.end_id(tokenizer)
    sep = self._ids(tokenizer, self.separator)
    heads = {role: self._header_ids(tokenizer, role) for role in self.header}
    out = []
    for messages in conversations:
      ids, mask = [], []
      for m in messages:
        learn = int(m['role'] == 'assistant')
        body = list(next(encoded)) + [end]
        ids += heads[m['role']] + body + sep
        mask += ([0] * len(heads[m['role']]) + [learn] * len(body)
                 + [0] * len(sep))
      out.append((ids, mask))
    return out

  def prompt(self, tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids a model continues to answer: the turns, then the assistant
    header (generation stops at `end_id`)."""
    ids = self.render(tokenizer, messages)[0] if messages else []
    return ids + self._header_ids(tokenizer, 'assistant')

  def parse(self, tokenizer, ids: Sequence[int]) -> list[dict]:
    """The conversation `render` made `ids` from (its inverse)."""
    ids = [int(i) for i in ids]
    end = self.end_id(tokenizer)
    heads = {role: self._header_ids(tokenizer, role) for role in self.header}
    out, i = [], 0
    while i < len(ids):
      role = next((r for r, h in heads.items() if ids[i:i + len(h)] == h),
                  None)
      if role is None:  # a separator between turns
        i += 1
        continue
      start = i + len(heads[role])
      stop = ids.index(end, start) if end in ids[start:] else len(ids)
      out.append({'role': role,
                  'content': tokenizer.decode([ids[start:stop]])[0]})
      i = stop + 1
    return out


TEMPLATES = {
    'simple': ChatTemplate(
        'simple', {r: (f'<|{r}|>', '') for r in ROLES}, '<|end|>'),
    'chatml': ChatTemplate(
        'chatml', {r: ('<|im_start|>', f'{r}\n') for r in ROLES},
        '<|im_end|>', '\n'),
}


def control_symbols(name: str) -> tuple[str, ...]:
  """The pieces a tokenizer must reserve for template `name` ('' -> none)."""
  return get_template(name).pieces if name else ()


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise UserError(f'data.chat_template={name!r} is not one of '
                    f'{", ".join(TEMPLATES)}')
  return TEMPLATES[name]


def piece_id(tokenizer, piece: str) -> int:
  """The id of a reserved control piece; a UserError naming the fix if the
  tokenizer has none."""
  find = getattr(tokenizer, 'piece_id', None)
  i = find(piece) if find else None
  if i is None:
    raise UserError(
        f'the tokenizer has no control piece {piece!r}, which the chat '
        f'template needs: train the first run of the chain (the pretraining '
        f'LM) with --config.data.chat_template=<name>, which reserves them')
  return i


def load_template(workdir: str | None, name: str, tokenizer, *,
                  inherited: dict | None = None, save: bool = True
                  ) -> ChatTemplate | None:
  """The run's chat template: the workdir's saved one, else the one
  `inherited` from the run it started from (its JSON), else `name`'s; None
  when there is none. A template not yet in the workdir is saved there when
  `save`. Checks that the tokenizer has its control pieces."""
  path = os.path.join(workdir, TEMPLATE_FILE) if workdir else None
  if path and os.path.exists(path):
    with open(path) as f:
      template = ChatTemplate.from_json(json.load(f))
  else:
    if inherited:
      template = ChatTemplate.from_json(inherited)
    elif name:
      template = get_template(name)
    else:
      return None
    if path and save:
      sources.write_atomic(path, json.dumps(template.to_json(), indent=2)
                           .encode())
  for piece in template.pieces:
    piece_id(tokenizer, piece)
  return template


# -- validation and JSONL --------------------------------------------------------


def check_messages(messages: Any, where: str = 'conversation') -> list[dict]:
  """A list of {'role', 'content'} turns with known roles and string content."""
  if not isinstance(messages, list) or not messages:
    raise UserError(f'{where}: "messages" must be a non-empty list of '
                    f'{{"role", "content"}} turns')
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or 'role' not in m or 'content' not in m:
      raise UserError(f'{where}: turn {i} needs "role" and "content"')
    if m['role'] not in ROLES:
      raise UserError(f'{where}: turn {i} has unknown role {m["role"]!r}; '
                      f'roles are {", ".join(ROLES)}')
    if not isinstance(m['content'], str):
      raise UserError(f'{where}: turn {i} content must be a string')
  return messages


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
  """(where, object) per non-blank line: where = 'path:line'. Invalid UTF-8,
  malformed JSON and non-objects are UserErrors naming the line."""
  for n, line in enumerate(sources.stream_lines(path), 1):
    where = f'{path}:{n}'
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{where}: malformed JSON ({e.msg} at column '
                      f'{e.colno}); fix or remove the line') from None
    if not isinstance(obj, dict):
      raise UserError(f'{where}: expected a JSON object, got '
                      f'{type(obj).__name__}')
    yield where, obj


def prompt_messages(prompt: Any, where: str) -> list[dict]:
  """A prompt as turns: a string is one user turn ('' none), a list is turns."""
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}] if prompt else []
  return check_messages(prompt, where)


def completion_messages(completion: Any, where: str) -> list[dict]:
  """A completion as turns: a string is one assistant turn; it must say
  something (an empty response teaches nothing and is an error)."""
  if isinstance(completion, str):
    completion = [{'role': 'assistant', 'content': completion}]
  check_messages(completion, where)
  if not any(m['role'] == 'assistant' and m['content'].strip()
             for m in completion):
    raise UserError(f'{where}: empty response (no assistant turn with text)')
  return completion


def read_prompts(path: str) -> list[list[dict]]:
  """Prompts from JSONL ({"prompt": "..." or [turns]} or {"messages":
  [turns]}, a trailing assistant turn dropped) or, for any other file, one
  user turn per non-empty line."""
  if not path.endswith('.jsonl'):
    try:
      with open(path, encoding='utf-8') as f:
        lines = [line.strip() for line in f]
    except FileNotFoundError:
      raise UserError(f'{path} not found; give a prompts file') from None
    except UnicodeDecodeError as e:
      raise UserError(f'{path}: not UTF-8 text (byte {e.start}); re-encode '
                      f'it as UTF-8') from None
    out = [[{'role': 'user', 'content': line}] for line in lines if line]
  else:
    out = []
    for where, obj in read_jsonl(path):
      if 'prompt' in obj:
        messages = prompt_messages(obj['prompt'], where)
      elif 'messages' in obj:
        messages = check_messages(obj['messages'], where)
        while messages and messages[-1]['role'] == 'assistant':
          messages = messages[:-1]
      else:
        raise UserError(f'{where}: a prompt line needs "prompt" or '
                        f'"messages"')
      if not messages:
        raise UserError(f'{where}: the prompt is empty')
      out.append(messages)
  if not out:
    raise UserError(f'{path}: no prompts')
  return out


def read_sft(path: str) -> list[list[dict]]:
  """Conversations from SFT JSONL: {"messages"} or {"prompt", "completion"}."""
  out = []
  for where, obj in read_jsonl(path):
    if 'messages' in obj:
      messages = check_messages(obj['messages'], where)
      if not any(m['role'] == 'assistant' and m['content'].strip()
                 for m in messages):
        raise UserError(f'{where}: empty response (no assistant turn with '
                        f'text to learn from)')
    elif 'prompt' in obj and 'completion' in obj:
      messages = (prompt_messages(obj['prompt'], where)
                  + completion_messages(obj['completion'], where))
    else:
      raise UserError(f'{where}: missing field: an SFT line has "messages", '
                      f'or "prompt" and "completion"')
    out.append(messages)
  if not out:
    raise UserError(f'{path}: no conversations')
  return out


# -- human conversations: chitchat-dataset -----------------------------------------

# Held out by chat id, never trained on: 'val' for evaluation during
# training, 'test' for judging the finished models (their openings).
_SPLIT_PERCENT = {'train': (0, 90), 'val': (90, 95), 'test': (95, 100)}


def chitchat_path() -> str:
  """dataset.json inside the installed `chitchat-dataset` package."""
  try:
    import chitchat_dataset  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('the chitchat corpus is the PyPI package '
                    '`chitchat-dataset`: pip install -e ".[chat]"') from None
  path = os.path.join(os.path.dirname(chitchat_dataset.__file__),
                      'dataset.json')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: reinstall chitchat-dataset')
  return path


def chitchat_chats(split: str) -> list[list[str]]:
  """The chats of a split, each a list of turns (the two speakers alternate;
  a turn's messages are joined by spaces, empty ones dropped)."""
  if split not in _SPLIT_PERCENT:
    raise UserError(f'chitchat has splits {", ".join(_SPLIT_PERCENT)}, not '
                    f'{split!r}')
  with open(chitchat_path(), encoding='utf-8') as f:
    data = json.load(f)
  chats = []
  for key in sorted(data):
    if sources.hash_split(key, _SPLIT_PERCENT) != split:
      continue
    turns = [' '.join(m['text'].strip() for m in turn if m['text'].strip())
             for turn in data[key]['messages']]
    turns = [t for t in turns if t]
    if turns:
      chats.append(turns)
  return chats


def chitchat_text(split: str) -> str:
  """Pretraining text: one turn per line (each an LM document)."""
  return '\n'.join(t for chat in chitchat_chats(split) for t in chat) + '\n'


def chitchat_conversations(split: str, max_turns: int) -> list[list[dict]]:
  """Multi-turn SFT conversations: each chat cut into windows of at most
  `max_turns` turns (even, so every window opens with the first speaker,
  the user, and the second speaker is the assistant). Windows without an
  assistant turn are left out: there is nothing to learn from them."""
  if max_turns < 2 or max_turns % 2:
    raise UserError(f'max_turns={max_turns} must be even and >= 2')
  out = []
  for turns in chitchat_chats(split):
    for start in range(0, len(turns), max_turns):
      window = turns[start:start + max_turns]
      if len(window) >= 2:
        out.append([{'role': ROLES[1 + i % 2], 'content': t}
                    for i, t in enumerate(window)])
  return out
