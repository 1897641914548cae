"""Conversations, templates and preferences (data/chat.py, data/preferences.py).

Templates round-trip multi-turn conversations and mask the assistant's turns
only; the JSONL readers accept the formats people have and turn every
defect into one error naming the file and line; the human sentiment ratings
become rankings and held-out pairs; the SFT packer and the fixed-shape
pipelines keep every example.
"""

import json
import logging

import numpy as np
import pytest

import corpora
from corpora import data_root
from data import chat, pipeline, preferences
from data import tokenizer as tokenizers
from data.errors import UserError

CONVERSATION = [
    {'role': 'system', 'content': 'Be kind.'},
    {'role': 'user', 'content': 'hello there, how are you?'},
    {'role': 'assistant', 'content': 'i am fine,  thanks!'},
    {'role': 'user', 'content': ' and <|user|> you? '},
    {'role': 'assistant', 'content': 'émoji 😀 and\na new line'},
]


@pytest.fixture(scope='module', params=['simple', 'chatml'])
def template_and_tokenizer(request):
  texts = ['hello there how are you', 'i am fine thanks', 'and you'] * 100
  tok = tokenizers.train_tokenizer(
      texts, vocab_size=400, model_type='char',
      control_symbols=chat.control_symbols(request.param))
  return chat.get_template(request.param), tok


def test_the_template_round_trips_a_multi_turn_conversation(
    template_and_tokenizer):
  template, tok = template_and_tokenizer
  ids, mask = template.render(tok, CONVERSATION)
  assert len(ids) == len(mask)
  assert template.parse(tok, ids) == CONVERSATION


def test_the_loss_mask_covers_assistant_turns_and_their_end_only(
    template_and_tokenizer):
  template, tok = template_and_tokenizer
  ids, mask = template.render(tok, CONVERSATION)
  end = template.end_id(tok)
  learned = [i for i, m in zip(ids, mask) if m]
  # The learned tokens are the two replies, each closed by the end piece.
  replies = [m['content'] for m in CONVERSATION if m['role'] == 'assistant']
  cut = learned.index(end)
  assert learned[cut + 1:].count(end) == 1 and learned[-1] == end
  assert tok.decode([learned[:cut]])[0] == replies[0]
  assert tok.decode([learned[cut + 1:-1]])[0] == replies[1]
  # The prompt for a reply ends with the assistant's header, unmasked.
  prompt = template.prompt(tok, CONVERSATION[:2])
  context = template.render(tok, CONVERSATION[:2])[0]
  assert prompt[:len(context)] == context and len(prompt) > len(context)
  assert template.parse(tok, prompt + tok.encode('hi', add_eos=False)
                        + [end])[-1] == {'role': 'assistant', 'content': 'hi'}


def test_typed_control_markers_stay_text(template_and_tokenizer):
  template, tok = template_and_tokenizer
  pieces = {chat.piece_id(tok, p) for p in template.pieces}
  assert not pieces & set(tok.encode(''.join(template.pieces), add_eos=False))


def test_a_tokenizer_without_the_pieces_is_a_clear_error():
  tok = tokenizers.train_tokenizer(['hello there'] * 50, vocab_size=400,
                                   model_type='char')
  with pytest.raises(UserError, match='no control piece.*chat_template'):
    chat.get_template('simple').render(tok, CONVERSATION)


def _write(path, lines):
  path.write_text(''.join(l + '\n' for l in lines))
  return str(path)


def test_sft_formats_are_read(tmp_path):
  path = _write(tmp_path / 'sft.jsonl', [
      json.dumps({'messages': CONVERSATION}), '',
      json.dumps({'prompt': 'hi', 'completion': 'hello'}),
      json.dumps({'prompt': [{'role': 'user', 'content': 'q'}],
                  'completion': [{'role': 'assistant', 'content': 'a'}]})])
  convs = chat.read_sft(path)
  assert convs[0] == CONVERSATION
  assert convs[1] == [{'role': 'user', 'content': 'hi'},
                      {'role': 'assistant', 'content': 'hello'}]
  assert len(convs) == 3


@pytest.mark.parametrize('line,message', [
    ('{"messages": [', 'sft.jsonl:2: malformed JSON'),
    ('[1, 2]', 'sft.jsonl:2: expected a JSON object'),
    ('{"text": "hi"}', 'sft.jsonl:2: missing field'),
    ('{"messages": [{"role": "bot", "content": "x"}]}', 'unknown role'),
    ('{"messages": [{"role": "user", "content": "x"}]}', 'empty response'),
    ('{"prompt": "x", "completion": "  "}', 'sft.jsonl:2: empty response'),
    ('{"messages": [{"role": "user"}]}', 'needs "role" and "content"'),
])
def test_bad_sft_lines_name_the_line(tmp_path, line, message):
  path = _write(tmp_path / 'sft.jsonl',
                [json.dumps({'prompt': 'a', 'completion': 'b'}), line])
  with pytest.raises(UserError, match=message):
    chat.read_sft(path)


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / 'sft.jsonl'
  path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n')
  with pytest.raises(UserError, match='sft.jsonl: invalid UTF-8 on line 2'):
    chat.read_sft(str(path))


def test_preferences_pairs_and_rankings_with_ties(tmp_path):
  path = _write(tmp_path / 'prefs.jsonl', [
      json.dumps({'prompt': 'p', 'chosen': 'good', 'rejected': 'bad'}),
      json.dumps({'prompt': '', 'responses': ['a', 'b', 'c', 'd'],
                  'ranking': [2, [0, 3], 1]})])
  pair, ranking = preferences.read_preferences(path)
  assert pair.prompt == [{'role': 'user', 'content': 'p'}]
  assert pair.comparisons() == [(0, 1)]
  assert ranking.prompt == [] and ranking.levels == [1, 2, 0, 1]
  # 0 and 3 tie: 5 comparisons instead of C(4, 2) = 6, none between them.
  assert sorted(ranking.comparisons()) == [(0, 1), (2, 0), (2, 1), (2, 3),
                                           (3, 1)]
  pairs = preferences.as_pairs([ranking])
  assert len(pairs) == 5 and all(p.levels == [0, 1] for p in pairs)


@pytest.mark.parametrize('obj,message', [
    ({'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [0, 0]},
     'lists response 0 twice'),
    ({'prompt': 'p', 'responses': ['a', 'b', 'c'], 'ranking': [0, 2]},
     r'leaves out responses \[1\]'),
    ({'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [0, 5]},
     'not a response index'),
    ({'prompt': 'p', 'responses': ['a', 'b'], 'ranking': [[0, 1]]},
     'every response ties'),
    ({'prompt': 'p', 'chosen': 'a'}, 'missing field "rejected"'),
    ({'prompt': 'p', 'chosen': 'a', 'rejected': ''}, 'empty response'),
    ({'chosen': 'a', 'rejected': 'b'}, 'missing field "prompt"'),
    ({'prompt': 'p', 'responses': ['a', 'b']}, 'missing field "ranking"'),
])
def test_bad_preference_lines_name_the_line(tmp_path, obj, message):
  path = _write(tmp_path / 'prefs.jsonl', [
      json.dumps({'prompt': 'p', 'chosen': 'a', 'rejected': 'b'}),
      json.dumps(obj)])
  with pytest.raises(UserError, match=message) as e:
    preferences.read_preferences(path)
  assert 'prefs.jsonl:2' in str(e.value)


def test_too_long_examples_are_dropped_and_counted_never_cut(caplog):
  texts = ['hello there how are you', 'i am fine thanks'] * 100
  tok = tokenizers.train_tokenizer(texts, vocab_size=400, model_type='char',
                                   control_symbols=chat.control_symbols('simple'))
  template = chat.get_template('simple')
  rankings = [preferences.Ranking([], ['hi', 'hello there ' * 20], [0, 1]),
              preferences.Ranking([], ['hi', 'you'], [1, 0])]
  with caplog.at_level(logging.WARNING):
    rows, dropped = preferences.ranking_rows(template, tok, rankings, k=3,
                                             max_length=16, what='test')
  assert dropped == 1 and len(rows) == 1 and 'dropped 1 of 2' in caplog.text
  row = rows[0]
  assert row['levels'].tolist() == [1, 0, -1]
  assert row['inputs'].shape == (3, 16) and not row['inputs'][2].any()
  with pytest.raises(UserError, match='raise reward.k'):
    preferences.ranking_rows(template, tok, rankings, k=1, max_length=16,
                             what='test')
  examples = [{'inputs': [1] * n, 'targets': [2] * n, 'loss_mask': [1] * n}
              for n in (5, 40, 16, 17)]
  kept, dropped = pipeline.fit_length(examples, 16, 'sft')
  assert dropped == 2 and [len(e['inputs']) for e in kept] == [5, 16]


def test_pair_rows_mask_the_response_tokens_only():
  texts = ['hello there how are you', 'i am fine thanks'] * 100
  tok = tokenizers.train_tokenizer(texts, vocab_size=400, model_type='char',
                                   control_symbols=chat.control_symbols('simple'))
  template = chat.get_template('simple')
  pair = preferences.Ranking([{'role': 'user', 'content': 'how are you'}],
                             ['i am fine', 'hello'], [0, 1])
  (row,), _ = preferences.pair_rows(template, tok, [pair], max_length=32,
                                    what='test')
  for i, text in enumerate(pair.responses):
    learned = row['targets'][i][row['loss_mask'][i] > 0].tolist()
    assert learned[-1] == template.end_id(tok)
    assert tok.decode([learned[:-1]])[0] == text
    n = int(row['inputs_segmentation'][i].sum())
    # targets are the inputs shifted by one within the sequence
    assert row['targets'][i][:n - 1].tolist() == row['inputs'][i][1:n].tolist()


def test_sequence_packing_keeps_every_token_and_its_mask():
  rng = np.random.default_rng(0)
  examples = []
  for i in range(30):
    n = int(rng.integers(1, 12))
    ids = [100 + i] + rng.integers(5, 50, n - 1).tolist()
    examples.append({'inputs': ids, 'targets': ids[1:] + [1],
                     'loss_mask': rng.integers(0, 2, n).tolist()})
  ds = pipeline.sequence_train(examples, batch_size=4, max_length=16, seed=3)
  it = iter(ds)
  seen = []
  for _ in range(8):
    batch = next(it)
    assert sorted(batch) == sorted(pipeline.SEQUENCE_KEYS)
    for r in range(4):
      seg = batch['inputs_segmentation'][r]
      for s in range(1, seg.max() + 1):
        at = seg == s
        assert (batch['inputs_position'][r][at] == np.arange(at.sum())).all()
        seen.append(tuple(tuple(batch[k][r][at].tolist()) for k in
                          ('inputs', 'targets', 'loss_mask')))
      assert not batch['loss_mask'][r][seg == 0].any()
  want = {tuple(tuple(e[k]) for k in ('inputs', 'targets', 'loss_mask'))
          for e in examples}
  assert set(seen) <= want and len(set(seen)) == len(want)  # an epoch's worth


def test_fixed_shape_examples_reshuffle_and_resume():
  rows = [{'x': np.full((2, 3), i, np.int32)} for i in range(10)]
  ds = pipeline.examples_train(rows, batch_size=4, seed=1)
  it = iter(ds)
  first = [next(it)['x'][:, 0, 0].tolist() for _ in range(5)]
  epoch0 = sorted(first[0] + first[1] + [first[2][0], first[2][1]])
  assert epoch0 == list(range(10))
  it2 = iter(ds)
  next(it2)
  state = it2.get_state()
  it3 = iter(ds)
  it3.set_state(state)
  assert [next(it3)['x'][:, 0, 0].tolist() for _ in range(4)] == first[1:]
  batches = list(pipeline.examples_eval_batches(rows, batch_size=4))
  assert [b['x'][:, 0, 0].tolist() for b in batches] == [
      [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]


# -- the real human data ------------------------------------------------------------


def test_sentiment_ratings_split_rank_and_pair():
  root = data_root()
  if not (root / 'sentiment_ratings').exists():
    corpora.missing('sentiment_ratings')
  splits = {s: preferences.sentiment_ratings(root, 'tweets', s)
            for s in ('train', 'val', 'test')}
  ids = [{r.id for r in v} for v in splits.values()]
  assert sum(map(len, ids)) == len(set().union(*ids)) == 4200
  assert 350 < len(splits['test']) < 500  # about 10% held out
  rankings, dropped = preferences.rankings_from_ratings(splits['train'], 4,
                                                        0.5, seed=0)
  assert len(rankings) + dropped == len(splits['train']) // 4
  for r in rankings:
    assert len(r.responses) == 4 and r.prompt == [] and max(r.levels) > 0
  # Ties: two sentences closer than the margin share a level.
  rated = [preferences.Rated('t', str(i), x, f's{i}')
           for i, x in enumerate([2.0, 1.8, 0.9, -3.0])]
  (ranking,), _ = preferences.rankings_from_ratings(rated, 4, 0.5, seed=0)
  by_text = dict(zip(ranking.responses, ranking.levels))
  assert by_text == {'s0': 0, 's1': 0, 's2': 1, 's3': 2}
  close = [preferences.Rated('t', str(i), 1.0 + i / 10, 'x') for i in range(4)]
  assert preferences.rankings_from_ratings(close, 4, 0.5, seed=0) == ([], 1)
  pairs = preferences.rated_pairs(rated, 1.0)
  assert sorted(pairs) == [(0, 2), (0, 3), (1, 3), (2, 3)]
  # (2, 3) tie on their scores: half a pair right.
  assert preferences.pairwise_accuracy([3, 3, 1, 1], pairs) == 0.875


def test_a_malformed_ratings_line_names_the_file_and_line(tmp_path):
  folder = tmp_path / 'sentiment_ratings'
  folder.mkdir()
  (folder / 'tweets_GroundTruth.txt').write_text(
      '1\t2.5\tgood\r\n2\tnot-a-number\tbad\r\n')
  with pytest.raises(UserError, match='tweets_GroundTruth.txt:2'):
    preferences.sentiment_ratings(tmp_path, 'tweets')


def test_chitchat_conversations_alternate_and_hold_out_chats():
  pytest.importorskip('chitchat_dataset')
  val = chat.chitchat_conversations('val', 4)
  assert len(val) > 500
  for conv in val:
    assert 2 <= len(conv) <= 4
    assert [m['role'] for m in conv] == ['user', 'assistant', 'user',
                                         'assistant'][:len(conv)]
  # Every chat (7,168, a few empty ones aside) is in exactly one split,
  # by a hash of its id: ~90 / 5 / 5.
  sizes = {s: len(chat.chitchat_chats(s)) for s in ('train', 'val', 'test')}
  assert 7100 < sum(sizes.values()) <= 7168
  assert 300 < sizes['val'] < 420 and 300 < sizes['test'] < 420
  with pytest.raises(UserError, match='even'):
    chat.chitchat_conversations('val', 3)
