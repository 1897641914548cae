"""Preferences: pairs and K-way rankings of responses to one prompt.

A `Ranking` is a prompt (a list of turns; [] for none), K responses and a
rank level per response: 0 is best, and responses that tie share a level.
Only responses on different levels are compared, so ties never become pairs
(InstructGPT ranks K = 4..9 answers per prompt and trains on all C(K, 2)
comparisons; a pair is the K = 2 case).

JSONL formats (one object per line; a bad line is a UserError naming the
file and line, nothing is skipped silently):

  pairs     {"prompt": ..., "chosen": "...", "rejected": "..."}
  rankings  {"prompt": ..., "responses": ["...", ...], "ranking": [2, [0, 3], 1]}
            ranking: response indices, best first; a nested list is a tie;
            flattened it must be a permutation of the responses

The prompt is a string (one user turn; "" for none) or a list of turns.

Human judgments at hand: the sentiment ratings of VADER's paper
(../shared/data/sentiment_ratings: 18,513 sentences, each rated -4..+4 by at
least 20 people). `rankings_from_ratings` groups K sentences of one source
and ranks them by their mean rating; `rated_pairs` gives the held-out pairs
the reward model is judged on, and `pairwise_accuracy` scores any scorer on
them (VADER itself included).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import numpy as np
from absl import logging

from data import chat, sources
from data import tokenizer as tokenizers
from data.errors import UserError


@dataclasses.dataclass(frozen=True)
class Ranking:
  """Responses to one prompt with rank levels (0 best; equal = tie)."""
  prompt: list[dict]
  responses: list[str]
  levels: list[int]

  def comparisons(self) -> list[tuple[int, int]]:
    """(better, worse) response indices of every compared pair."""
    k = len(self.responses)
    return [(i, j) for i in range(k) for j in range(k)
            if self.levels[i] < self.levels[j]]


def _response(text: Any, where: str, what: str) -> str:
  if not isinstance(text, str):
    raise UserError(f'{where}: "{what}" must be a string')
  if not text.strip():
    raise UserError(f'{where}: empty response in "{what}"')
  return text


def levels_from_ranking(ranking: Any, k: int, where: str) -> list[int]:
  """Rank level of each of k responses from a best-first ranking with ties."""
  if not isinstance(ranking, list):
    raise UserError(f'{where}: "ranking" must be a list of response indices')
  levels = [None] * k
  for level, entry in enumerate(ranking):
    for i in entry if isinstance(entry, list) else [entry]:
      if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < k:
        raise UserError(f'{where}: "ranking" entry {i!r} is not a response '
                        f'index 0..{k - 1}')
      if levels[i] is not None:
        raise UserError(f'{where}: "ranking" lists response {i} twice; it '
                        f'must be a permutation of the {k} responses')
      levels[i] = level
  missing = [i for i, l in enumerate(levels) if l is None]
  if missing:
    raise UserError(f'{where}: "ranking" leaves out responses {missing}; it '
                    f'must be a permutation of the {k} responses')
  return levels


def parse_preference(obj: dict, where: str) -> Ranking:
  """A pair or a ranking line (see the module docstring)."""
  if 'prompt' not in obj:
    raise UserError(f'{where}: missing field "prompt"')
  prompt = chat.prompt_messages(obj['prompt'], where)
  if 'chosen' in obj or 'rejected' in obj:
    for key in ('chosen', 'rejected'):
      if key not in obj:
        raise UserError(f'{where}: missing field "{key}" of a pair')
    return Ranking(prompt, [_response(obj['chosen'], where, 'chosen'),
                            _response(obj['rejected'], where, 'rejected')],
                   [0, 1])
  for key in ('responses', 'ranking'):
    if key not in obj:
      raise UserError(f'{where}: missing field "{key}": a line is a pair '
                      f'(chosen, rejected) or a ranking (responses, ranking)')
  responses = obj['responses']
  if not isinstance(responses, list) or len(responses) < 2:
    raise UserError(f'{where}: "responses" must list at least 2 responses')
  responses = [_response(r, where, f'responses[{i}]')
               for i, r in enumerate(responses)]
  levels = levels_from_ranking(obj['ranking'], len(responses), where)
  if len(set(levels)) < 2:
    raise UserError(f'{where}: every response ties: nothing to compare')
  return Ranking(prompt, responses, levels)


def read_preferences(path: str) -> list[Ranking]:
  """Pairs and rankings from a JSONL file (either format on any line)."""
  out = [parse_preference(obj, where) for where, obj in chat.read_jsonl(path)]
  if not out:
    raise UserError(f'{path}: no preference lines')
  return out


# -- human sentiment ratings --------------------------------------------------------

SENTIMENT_FILES = {
    'tweets': 'tweets_GroundTruth.txt',
    'movies': 'movieReviewSnippets_GroundTruth.txt',
    'amazon': 'amazonReviewSnippets_GroundTruth.txt',
}
# Held out by sentence id, per source: 'val' during training, 'test' for the
# reported pairwise accuracy (never trained on).
SENTIMENT_SPLITS = {'train': (0, 85), 'val': (85, 90), 'test': (90, 100)}


@dataclasses.dataclass(frozen=True)
class Rated:
  """One sentence and its mean human rating (-4..+4)."""
  source: str
  id: str
  rating: float
  text: str


def sentiment_ratings(root: str | pathlib.Path, source: str,
                      split: str | None = None) -> list[Rated]:
  """The rated sentences of one source (`SENTIMENT_FILES`), in file order,
  optionally one split of them."""
  if source not in SENTIMENT_FILES:
    raise UserError(f'sentiment source {source!r} is not one of '
                    f'{", ".join(SENTIMENT_FILES)}')
  if split is not None and split not in SENTIMENT_SPLITS:
    raise UserError(f'sentiment ratings have splits '
                    f'{", ".join(SENTIMENT_SPLITS)}, not {split!r}')
  path = pathlib.Path(root) / 'sentiment_ratings' / SENTIMENT_FILES[source]
  out = []
  for n, line in enumerate(sources.stream_lines(path), 1):
    line = line.rstrip('\r')
    if not line.strip():
      continue
    parts = line.split('\t', 2)
    try:
      rating = float(parts[1])
    except (IndexError, ValueError):
      raise UserError(f'{path}:{n}: expected ID<TAB>mean rating<TAB>text; '
                      f'restore the file from the vaderSentiment sdist'
                      ) from None
    if len(parts) < 3 or not parts[2].strip():
      raise UserError(f'{path}:{n}: the sentence is missing')
    item = Rated(source, parts[0], rating, parts[2])
    if split is None or sources.hash_split(f'{source}/{item.id}',
                                           SENTIMENT_SPLITS) == split:
      out.append(item)
  return out


def rankings_from_ratings(items: Sequence[Rated], k: int, tie_margin: float,
                          seed: int) -> tuple[list[Ranking], int]:
  """(rankings, groups dropped): seeded groups of k sentences of one source,
  ranked by mean rating with no prompt.

  Sorted best first, a sentence starts a new rank level when its rating is
  at least `tie_margin` below the first of the current level; sentences
  closer than that tie (raters disagree by about a point). A group whose
  sentences all tie has nothing to compare: it is dropped and counted.
  """
  if k < 2:
    raise UserError(f'rankings need k >= 2 responses, got {k}')
  out, dropped = [], 0
  by_source: dict[str, list[Rated]] = {}
  for item in items:
    by_source.setdefault(item.source, []).append(item)
  rng = np.random.default_rng(seed)
  for source in sorted(by_source):
    pool = by_source[source]
    order = rng.permutation(len(pool))
    for start in range(0, len(order) - k + 1, k):
      group = sorted((pool[i] for i in order[start:start + k]),
                     key=lambda r: -r.rating)
      levels, top = [0], group[0].rating
      for r in group[1:]:
        if top - r.rating >= tie_margin:
          top = r.rating
          levels.append(levels[-1] + 1)
        else:
          levels.append(levels[-1])
      if levels[-1] == 0:
        dropped += 1
        continue
      out.append(Ranking([], [r.text for r in group], levels))
  return out, dropped


def rated_pairs(items: Sequence[Rated], min_gap: float
                ) -> list[tuple[int, int]]:
  """(better, worse) indices of every pair whose mean ratings differ by at
  least `min_gap`."""
  ratings = np.asarray([r.rating for r in items])
  better, worse = np.nonzero(ratings[:, None] - ratings[None, :] >= min_gap)
  return list(zip(better.tolist(), worse.tolist()))


def pairwise_accuracy(scores: Sequence[float],
                      pairs: Sequence[tuple[int, int]]) -> float:
  """Share of pairs the scores order like the people did; a tie counts half."""
  if not pairs:
    return float('nan')
  s = np.asarray(scores, np.float64)
  b, w = np.asarray(pairs).T
  return float(np.mean((s[b] > s[w]) + 0.5 * (s[b] == s[w])))


def sentiment_rankings(root, split: str, sources: Sequence[str], k: int,
                       tie_margin: float, seed: int
                       ) -> tuple[list[Ranking], int]:
  """`rankings_from_ratings` over one split of several sources."""
  items = [r for s in sources for r in sentiment_ratings(root, s, split)]
  return rankings_from_ratings(items, k, tie_margin, seed)


def as_pairs(rankings: Sequence[Ranking]) -> list[Ranking]:
  """Every comparison of every ranking as a pair (chosen first): DPO's data."""
  return [Ranking(r.prompt, [r.responses[b], r.responses[w]], [0, 1])
          for r in rankings for b, w in r.comparisons()]


def _render(template, tokenizer, rankings: Sequence[Ranking]):
  """Per ranking, per response: (ids, loss mask) of the document start
  (EOS for our LMs: where pretraining documents started) + the prompt and
  the response as the assistant's turn."""
  convs = [r.prompt + [{'role': 'assistant', 'content': text}]
           for r in rankings for text in r.responses]
  rendered = iter(template.render_batch(tokenizer, convs))
  start = tokenizers.document_start(tokenizer)
  return [[(start + ids, [0] * len(start) + mask) for ids, mask in
           (next(rendered) for _ in r.responses)] for r in rankings]


def ranking_rows(template, tokenizer, rankings: Sequence[Ranking], *, k: int,
                 max_length: int, what: str) -> tuple[list[dict], int]:
  """(rows, dropped): each ranking as fixed-shape int32 arrays for a reward
  model: inputs, inputs_segmentation, inputs_position [k, max_length] and
  levels [k] (-1 where a ranking has fewer than k responses). A ranking
  with a response longer than max_length is dropped whole and counted."""
  rows, dropped = [], 0
  for r, rendered in zip(rankings, _render(template, tokenizer, rankings)):
    if len(r.responses) > k:
      raise UserError(f'{what}: a ranking has {len(r.responses)} responses, '
                      f'more than reward.k={k}; raise reward.k')
    if any(len(ids) > max_length for ids, _ in rendered):
      dropped += 1
      continue
    row = {key: np.zeros((k, max_length), np.int32) for key in
           ('inputs', 'inputs_segmentation', 'inputs_position')}
    row['levels'] = np.full((k,), -1, np.int32)
    for i, ((ids, _), level) in enumerate(zip(rendered, r.levels)):
      n = len(ids)
      row['inputs'][i, :n] = ids
      row['inputs_segmentation'][i, :n] = 1
      row['inputs_position'][i, :n] = np.arange(n)
      row['levels'][i] = level
    rows.append(row)
  _log_dropped(what, dropped, len(rankings), max_length)
  return rows, dropped


def pair_rows(template, tokenizer, pairs: Sequence[Ranking], *,
              max_length: int, what: str) -> tuple[list[dict], int]:
  """(rows, dropped): each pair (chosen, rejected) as [2, max_length - 1]
  int32 arrays for DPO: inputs, targets (the next tokens), loss_mask (the
  response's tokens: the assistant content and its end of turn),
  inputs_segmentation, inputs_position. Pairs that do not fit are dropped
  whole and counted."""
  length = max_length - 1
  rows, dropped = [], 0
  for rendered in _render(template, tokenizer, pairs):
    if any(len(ids) > max_length for ids, _ in rendered):
      dropped += 1
      continue
    row = {key: np.zeros((2, length), np.int32) for key in
           ('inputs', 'targets', 'loss_mask', 'inputs_segmentation',
            'inputs_position')}
    for i, (ids, mask) in enumerate(rendered):
      n = len(ids) - 1
      row['inputs'][i, :n] = ids[:-1]
      row['targets'][i, :n] = ids[1:]
      row['loss_mask'][i, :n] = mask[1:]
      row['inputs_segmentation'][i, :n] = 1
      row['inputs_position'][i, :n] = np.arange(n)
    rows.append(row)
  _log_dropped(what, dropped, len(pairs), max_length)
  return rows, dropped


def _log_dropped(what: str, dropped: int, total: int, max_length: int):
  if dropped:
    logging.warning('%s: dropped %d of %d with a response longer than '
                    'data.max_length=%d tokens', what, dropped, total,
                    max_length)
