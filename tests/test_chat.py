"""Chat, serving and judging on the tiny chat chain (tests/conftest.py `chain`).

- `transflax serve` through the official `openai` client: greedy replies
  are the same streamed or not, and the same when four requests arrive
  together (decoded as one batch) as one by one; bad requests get status
  400 in the API's error shape; a client that disconnects mid-stream
  leaves the server serving.
- `transflax chat` under a pseudo-terminal: a scripted two-turn
  conversation, whose first reply is the greedy reply; the history is
  trimmed to the context from the oldest turns.
- `transflax judge`: the KL of a model to itself is 0 and to another > 0,
  positivity is VADER's mean over the replies, results.json keeps its keys.
- DPO on sampled pairs: rankings ordered by the reward model's scores,
  written once and read back on resume.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import select
import socket
import sys
import threading
import time

import jax
import numpy as np
import openai
import pytest

import tiny_chat
from train import chat, judge, loop, serve

PROMPTS = ['repeat: sun', 'repeat: the cat', 'repeat: red dog ran',
           'repeat: moon and sun']


@pytest.fixture(scope='module')
def server(chain):
  _, workdirs = chain
  model = chat.ChatModel(str(workdirs['sft']))
  # The tiny SFT model answers every prompt alike; its weights plus noise
  # give each prompt a greedy reply of its own, so that a batch that mixed
  # up its rows would show.
  leaves, tree = jax.tree.flatten(model.params)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  model.params = jax.tree.unflatten(tree, [
      x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  srv = serve.Server(model, port=0, max_batch=4)
  threading.Thread(target=srv.serve_forever, daemon=True).start()
  yield srv
  srv.shutdown()


def _ask(client, prompt, **kwargs):
  return client.chat.completions.create(
      model='sft', messages=[{'role': 'user', 'content': prompt}],
      temperature=0, max_tokens=12, **kwargs)


def test_serve_speaks_the_openai_api_and_batches_requests(server, chain):
  client = openai.OpenAI(base_url=server.url, api_key='unused')
  assert [m.id for m in client.models.list().data] == ['sft']
  one = _ask(client, PROMPTS[0])
  text = one.choices[0].message.content
  *_, (ids, _) = server.model.stream(
      [server.model.context([{'role': 'user', 'content': PROMPTS[0]}])],
      max_new_tokens=12, temperature=0.0)
  assert one.object == 'chat.completion'
  assert text == server.model.text(ids[0]) and text
  assert one.choices[0].finish_reason in ('stop', 'length')
  assert one.usage.prompt_tokens == len(server.model.context(
      [{'role': 'user', 'content': PROMPTS[0]}]))
  chunks = list(_ask(client, PROMPTS[0], stream=True))
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == text
  assert chunks[-1].choices[0].finish_reason == one.choices[0].finish_reason

  sequential = [_ask(client, p).choices[0].message.content for p in PROMPTS]
  together = [None] * len(PROMPTS)

  def go(i):
    together[i] = _ask(client, PROMPTS[i]).choices[0].message.content
  batches = server.batcher.batches
  with server.batcher.gate:   # no batch starts until all four have arrived
    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
      t.start()
    deadline = time.time() + 60
    while (server.batcher.inbox.qsize() + len(server.batcher.waiting) < 4
           and time.time() < deadline):
      time.sleep(0.01)
  for t in threads:
    t.join()
  assert together == sequential and len(set(sequential)) == len(PROMPTS)
  assert server.batcher.batches - batches == 1   # one decode batch of four


def test_serve_rejects_bad_requests_with_400(server):
  client = openai.OpenAI(base_url=server.url, api_key='unused', max_retries=0)
  bad = [dict(messages=[{'role': 'robot', 'content': 'hi'}]),
         dict(messages=[{'role': 'user', 'content': 'hi'}], temperature=5),
         dict(messages=[{'role': 'user', 'content': 'hi'}], n=2),
         dict(messages=[{'role': 'user', 'content': 'sun ' * 200}]),
         dict(messages=[])]
  for kwargs in bad:
    with pytest.raises(openai.BadRequestError) as e:
      client.chat.completions.create(model='sft', **kwargs)
    assert e.value.status_code == 400
    assert e.value.body['type'] == 'invalid_request_error'
  with pytest.raises(openai.BadRequestError) as e:
    client.chat.completions.create(
        model='sft', messages=[{'role': 'user', 'content': 'sun ' * 200}])
  assert e.value.body['code'] == 'context_length_exceeded'
  # Not JSON at all: still the error shape, and the server lives on.
  conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=60)
  conn.request('POST', '/v1/chat/completions', body=b'{oops',
               headers={'Content-Type': 'application/json'})
  response = conn.getresponse()
  assert response.status == 400
  assert json.loads(response.read())['error']['type'] == 'invalid_request_error'
  conn.request('GET', '/v1/nothing')
  response = conn.getresponse()
  assert response.status == 404 and 'error' in json.loads(response.read())
  conn.close()
  assert _ask(client, PROMPTS[1]).choices[0].message.content


def test_serve_survives_a_client_that_disconnects_mid_stream(server):
  body = json.dumps({'model': 'sft', 'stream': True, 'max_tokens': 40,
                     'temperature': 1.0, 'seed': 3, 'messages': [
                         {'role': 'user', 'content': 'repeat: sun'}]}).encode()
  with socket.create_connection(('127.0.0.1', server.port)) as s:
    s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n'
              b'Content-Type: application/json\r\n'
              + f'Content-Length: {len(body)}\r\n\r\n'.encode() + body)
    s.settimeout(60)
    got = b''
    while b'data: ' not in got:   # headers and events may come in pieces
      chunk = s.recv(4096)
      assert chunk, got
      got += chunk
  deadline = time.time() + 60
  while server.batcher.live_rows and time.time() < deadline:
    time.sleep(0.05)
  assert server.batcher.live_rows == 0
  client = openai.OpenAI(base_url=server.url, api_key='unused')
  assert _ask(client, PROMPTS[2]).choices[0].message.content


def test_history_is_trimmed_from_the_oldest_turns(chain):
  model = chat.ChatModel(str(chain[1]['sft']), system='be brief')
  turns = []
  for i in range(12):
    turns += [{'role': 'user', 'content': f'repeat: sun moon {i}'},
              {'role': 'assistant', 'content': 'sun moon'}]
  turns.append({'role': 'user', 'content': 'repeat: the end'})
  ids, dropped = model.fit(turns, max_new_tokens=8)
  assert dropped > 0 and dropped % 2 == 0
  assert len(ids) - 1 + 8 <= model.config.max_len
  assert ids == model.context([{'role': 'system', 'content': 'be brief'}]
                              + turns[dropped:])
  with pytest.raises(chat.ContextTooLong):
    model.fit([{'role': 'user', 'content': 'sun ' * 100}], max_new_tokens=8)


def _read_until(fd, marker: bytes, timeout=240) -> bytes:
  out, deadline = b'', time.time() + timeout
  while marker not in out:
    assert time.time() < deadline, out.decode(errors='replace')
    ready, _, _ = select.select([fd], [], [], 1)
    if ready:
      try:
        out += os.read(fd, 4096)
      except OSError:
        break
  return out


def test_terminal_chat_under_a_pseudo_terminal(chain):
  """Two turns typed into `transflax chat` on a pseudo-terminal: each reply
  is the one the same seed samples in-process from the conversation so
  far (the second turn sees the first: the history is kept)."""
  sft = str(chain[1]['sft'])
  model = chat.ChatModel(sft)
  turns, expected = [], []
  for seed, text in ((1, 'repeat: sun'), (2, 'repeat: moon')):
    turns.append({'role': 'user', 'content': text})
    *_, (ids, _) = model.stream([model.fit(turns, 8)[0]], max_new_tokens=8,
                                temperature=1.0, seed=seed)
    expected.append(model.text(ids[0]))
    turns.append({'role': 'assistant', 'content': expected[-1]})
  assert expected[0].strip() and expected[1].strip()
  pid, fd = pty.fork()
  if pid == 0:  # the child: the chat, on the pseudo-terminal
    os.execv(sys.executable, [sys.executable, '-m', 'train', 'chat',
                              '--workdir', sft, '--temperature', '1',
                              '--top_k', '0', '--top_p', '1', '--seed', '1',
                              '--max_new_tokens', '8'])
  try:
    _read_until(fd, b'> ')
    os.write(fd, b'repeat: sun\n')
    turn1 = _read_until(fd, b'\n> ').decode()
    os.write(fd, b'repeat: moon\n')
    turn2 = _read_until(fd, b'\n> ').decode()
    os.write(fd, b'\x04')   # Ctrl-D leaves
    _, status = os.waitpid(pid, 0)
  finally:
    os.close(fd)
  # The terminal echoes the typed line, then the reply streams on its own.
  assert turn1.splitlines()[-2].rstrip('\r') == expected[0]
  assert turn2.splitlines()[-2].rstrip('\r') == expected[1]
  assert os.waitstatus_to_exitcode(status) == 0


def test_judge_kl_positivity_and_results(chain, tmp_path):
  _, workdirs = chain
  sft, pretrain = str(workdirs['sft']), str(workdirs['pretrain'])
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('repeat: sun\nrepeat: the big cat\n\nrepeat: red\n')
  with open(os.path.join(sft, 'results.json'), 'w') as f:
    json.dump({'kept': 1}, f)
  common = dict(prompts=str(prompts), fluency_model=sft, max_new_tokens=8,
                max_prompt_length=24)
  same = judge.judge(sft, **common)
  assert same['num_prompts'] == 3 and same['kl'] == 0.0
  vader = judge.vader_scores([s['reply'] for s in same['samples']])
  assert same['positivity'] == pytest.approx(float(np.mean(vader)))
  assert np.isfinite(same['fluency_ppl']) and same['fluency_ppl'] > 1
  other = judge.judge(sft, reference=pretrain, reward_model=str(
      workdirs['reward']), **common)
  assert other['kl'] > 0 and np.isfinite(other['reward_mean'])
  saved = json.load(open(os.path.join(sft, 'results.json')))
  assert saved['kept'] == 1 and saved['judge']['kl'] == other['kl']


def test_dpo_on_pairs_sampled_and_ranked_by_the_reward_model(chain, tmp_path):
  experiment, workdirs = chain
  prompts = str(tmp_path.parent / 'prompts.jsonl')
  with open(prompts, 'w') as f:
    for p in PROMPTS * 2:
      f.write(json.dumps({'prompt': p}) + '\n')
  config = tiny_chat.load_config(experiment, 'dpo', **{
      'train.init_from': str(workdirs['sft']), 'data.corpus': 'sampled',
      'data.files.train': prompts, 'data.files.val': prompts,
      'data.test_split': '', 'dpo.reward_model': str(workdirs['reward']),
      'dpo.samples': 3, 'dpo.max_prompt_length': 16,
      'dpo.max_response_length': 8, 'dpo.keep_unfinished': True,
      'train.num_steps': 2, 'train.checkpoint_every': 2})
  workdir = str(tmp_path / 'dpo')
  loop.train_and_evaluate(config, workdir, evaluate_at_end=False)
  path = os.path.join(workdir, 'sampled_preferences', 'train.jsonl')
  rows = [json.loads(line) for line in open(path)]
  assert rows
  for row in rows:
    scores = [row['scores'][i] for i in row['ranking']]
    assert scores == sorted(scores, reverse=True)
  written = os.path.getmtime(path)
  config = tiny_chat.load_config(experiment, 'dpo', **{
      **{k: config[k.split('.')[0]][k.split('.')[1]] for k in (
          'train.init_from', 'data.corpus', 'data.files', 'data.test_split',
          'dpo.reward_model', 'dpo.samples', 'dpo.max_prompt_length',
          'dpo.max_response_length', 'dpo.keep_unfinished',
          'train.checkpoint_every')}, 'train.num_steps': 4})
  loop.train_and_evaluate(config, workdir, evaluate_at_end=False)
  assert os.path.getmtime(path) == written
