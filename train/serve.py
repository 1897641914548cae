"""An OpenAI-compatible chat server: `transflax serve --workdir DIR --port P`.

  POST /v1/chat/completions  {"model", "messages", "max_tokens" (or
                             "max_completion_tokens"), "temperature",
                             "top_p", "seed", "stream"}; with "stream": true
                             the reply comes as server-sent events
                             (chat.completion.chunk objects, then
                             `data: [DONE]`), else as one chat.completion
  GET  /v1/models            the one model served (named after the workdir)

Requests that arrive together are decoded together: one decode thread takes
every waiting request that shares the first one's sampling settings (up to
--max_batch), left-pads their contexts into one batch (widths and row counts
rounded up, so that a few compiled programs serve all traffic) and streams
each row's text to its client as tokens arrive. A row stops at its end of
turn or its max_tokens; the batch stops when no live row is left, so a
client that disconnects mid-stream (its row is dropped at the next write)
frees its slot. Requests with other settings wait for the next batch. One
seed serves a batch, so sampled replies depend on their batch-mates;
greedy replies (temperature 0) do not.

A bad request gets status 400 and the API's error object {"error":
{"message", "type": "invalid_request_error", "param", "code"}}, never a
crash; a context longer than the model reads gets code
"context_length_exceeded". Listens on 127.0.0.1 unless --host says
otherwise; Ctrl-C stops it.
"""

from __future__ import annotations

import http.server
import json
import queue
import threading
import time
import uuid
from typing import Any

import numpy as np

from data import chat as chat_data
from data.errors import UserError
from train import sampling
from train.chat import ChatModel

DEFAULT_MAX_TOKENS = 256


class BadRequest(Exception):
  def __init__(self, message: str, param: str | None = None,
               code: str | None = None, status: int = 400):
    super().__init__(message)
    self.param, self.code, self.status = param, code, status


class Request:
  """One chat completion in flight: its context, settings and outbox."""

  def __init__(self, context, max_tokens, temperature, top_p, seed):
    self.context, self.max_tokens = context, max_tokens
    self.settings = (float(temperature), float(top_p))
    self.seed = seed
    self.out: queue.Queue = queue.Queue()
    self.cancelled = threading.Event()
    self.finished = False


def _bucket(n: int, step: int) -> int:
  return -(-n // step) * step


class Batcher(threading.Thread):
  """The decode thread (module docstring). JAX runs here only."""

  def __init__(self, model: ChatModel, max_batch: int):
    super().__init__(daemon=True, name='transflax-decode')
    self.model, self.max_batch = model, max_batch
    self.inbox: queue.Queue = queue.Queue()
    self.waiting: list[Request] = []
    self.batches = 0     # decode batches run (tests read it)
    self.gate = threading.Lock()   # held: no new batch starts (tests)
    self.live_rows = 0   # rows still being decoded

  def submit(self, request: Request) -> None:
    self.inbox.put(request)

  def _next_batch(self) -> list[Request]:
    if not self.waiting:
      self.waiting.append(self.inbox.get())
    with self.gate:
      pass
    time.sleep(0.01)   # let requests sent together arrive together
    while True:
      try:
        self.waiting.append(self.inbox.get_nowait())
      except queue.Empty:
        break
    self.waiting = [r for r in self.waiting if not r.cancelled.is_set()]
    if not self.waiting:
      return []
    batch, width, new = [], 0, 0
    for r in self.waiting:
      # Same sampling settings, and the longest context and the longest
      # reply of the batch must fit the model together.
      w, n = max(width, len(r.context)), max(new, r.max_tokens)
      if (r.settings == self.waiting[0].settings and len(batch) < self.max_batch
          and w - 1 + n <= self.model.config.max_len):
        batch.append(r)
        width, new = w, n
    self.waiting = [r for r in self.waiting if r not in batch]
    return batch

  def run(self) -> None:
    while True:
      batch = self._next_batch()
      if batch:
        try:
          self._decode(batch)
        except Exception as e:  # pylint: disable=broad-except
          for r in batch:
            if not r.finished:
              r.out.put(('error', f'decoding failed: {e}'))
        finally:
          self.live_rows = 0

  def _decode(self, batch: list[Request]) -> None:
    model, cfg = self.model, self.model.config
    width = _bucket(max(len(r.context) for r in batch), 32)
    new = _bucket(max(r.max_tokens for r in batch), 32)
    if width - 1 + new > cfg.max_len:
      width = max(len(r.context) for r in batch)
      new = max(r.max_tokens for r in batch)
    rows = 1
    while rows < len(batch):
      rows *= 2
    temperature, top_p = batch[0].settings
    self.batches += 1
    self.live_rows = len(batch)

    def live():
      return np.asarray([not (r.finished or r.cancelled.is_set())
                         for r in batch])
    for ids, ended in model.stream(
        [r.context for r in batch], max_new_tokens=new,
        temperature=temperature, top_p=top_p, seed=batch[0].seed,
        width=width, rows=min(rows, self.max_batch), live=live):
      for r, row, done in zip(batch, ids, ended):
        if r.finished or r.cancelled.is_set():
          continue
        if len(row) >= r.max_tokens:      # its limit (an end token past it
          r.out.put(('ids', row[:r.max_tokens]))   # is not part of it)
          r.finished = True
          r.out.put(('end', 'length', r.max_tokens))
        else:
          r.out.put(('ids', row))
          if done:                        # the end token counts as a token
            r.finished = True
            r.out.put(('end', 'stop', len(row) + 1))
      self.live_rows = int(live().sum())
    for r in batch:
      if not r.finished:
        r.finished = True
        r.out.put(('end', 'length', r.max_tokens))


def _content(message: Any, i: int) -> dict:
  """An API message -> our turn (text parts of a content list joined)."""
  if not isinstance(message, dict):
    raise BadRequest(f'messages[{i}] must be an object', f'messages[{i}]')
  content = message.get('content')
  if isinstance(content, list):
    parts = []
    for part in content:
      if not (isinstance(part, dict) and part.get('type') == 'text'
              and isinstance(part.get('text'), str)):
        raise BadRequest(f'messages[{i}].content: only text parts are '
                         f'supported', f'messages[{i}].content')
      parts.append(part['text'])
    content = ''.join(parts)
  role = message.get('role')
  if role == 'developer':
    role = 'system'
  return {'role': role, 'content': content}


class Server:
  """The HTTP server and its decode thread; `serve_forever()` blocks."""

  def __init__(self, model: ChatModel, *, host: str = '127.0.0.1',
               port: int = 8000, max_batch: int = 8):
    self.model = model
    self.batcher = Batcher(model, max_batch)
    self.batcher.start()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # no line per request on stderr
        pass

      def do_GET(self):
        if self.path.rstrip('/') == '/v1/models':
          self._json(200, {'object': 'list', 'data': [server.model_card()]})
        elif self.path.rstrip('/') == f'/v1/models/{server.model.name}':
          self._json(200, server.model_card())
        else:
          self._error(BadRequest(f'no route GET {self.path}', status=404,
                                 code='not_found'))

      def do_POST(self):
        if self.path.rstrip('/') != '/v1/chat/completions':
          self._error(BadRequest(f'no route POST {self.path}', status=404,
                                 code='not_found'))
          return
        try:
          length = int(self.headers.get('Content-Length') or 0)
          try:
            body = json.loads(self.rfile.read(length) or b'null')
          except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f'the body is not JSON: {e}') from None
          request, stream = server.parse(body)
        except BadRequest as e:
          self._error(e)
          return
        server.batcher.submit(request)
        if stream:
          self._stream(request)
        else:
          self._complete(request)

      def _json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def _error(self, e: BadRequest):
        kind = ('invalid_request_error' if e.status < 500 else 'server_error')
        self._json(e.status, {'error': {'message': str(e), 'type': kind,
                                        'param': e.param, 'code': e.code}})

      def _complete(self, request):
        ids, reason, used = [], 'length', 0
        while True:
          kind, *rest = request.out.get()
          if kind == 'ids':
            ids = rest[0]
          elif kind == 'end':
            reason, used = rest
            break
          else:
            self._error(BadRequest(rest[0], status=500))
            return
        self._json(200, server.completion(request, ids, reason, used))

      def _stream(self, request):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-cache')
        self.send_header('Connection', 'close')
        self.end_headers()
        self.close_connection = True
        deltas, ids = sampling.TextDeltas(server.model.text), []
        chunk = server.chunk_maker()
        try:
          self._event(chunk({'role': 'assistant', 'content': ''}, None))
          while True:
            kind, *rest = request.out.get()
            if kind == 'ids':
              ids = rest[0]
              text = deltas(ids)
              if text:
                self._event(chunk({'content': text}, None))
            elif kind == 'end':
              text = deltas(ids, final=True)
              if text:
                self._event(chunk({'content': text}, None))
              self._event(chunk({}, rest[0]))
              break
            else:
              self._event({'error': {'message': rest[0],
                                     'type': 'server_error', 'param': None,
                                     'code': None}})
              break
          self.wfile.write(b'data: [DONE]\n\n')
          self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
          request.cancelled.set()   # the decode thread drops the row

      def _event(self, obj):
        self.wfile.write(f'data: {json.dumps(obj)}\n\n'.encode())
        self.wfile.flush()

    self.httpd = http.server.ThreadingHTTPServer((host, port), Handler)
    self.httpd.daemon_threads = True
    self.port = self.httpd.server_address[1]
    self.url = f'http://{host}:{self.port}/v1'

  def model_card(self) -> dict:
    return {'id': self.model.name, 'object': 'model', 'created': 0,
            'owned_by': 'transflax'}

  def parse(self, body: Any) -> tuple[Request, bool]:
    """A request body -> (Request, stream), or BadRequest saying why."""
    if not isinstance(body, dict):
      raise BadRequest('the body must be a JSON object')
    messages = body.get('messages')
    if not isinstance(messages, list) or not messages:
      raise BadRequest('messages must be a non-empty list', 'messages')
    turns = [_content(m, i) for i, m in enumerate(messages)]
    try:
      turns = chat_data.check_messages(turns, 'messages')
    except UserError as e:
      raise BadRequest(str(e), 'messages') from None
    if self.model.system and turns[0]['role'] != 'system':
      turns = [{'role': 'system', 'content': self.model.system}] + turns
    if body.get('n', 1) != 1:
      raise BadRequest('only n=1 is supported', 'n')
    if body.get('stop') is not None:
      raise BadRequest('stop sequences are not supported (replies end at '
                       'the end of the turn)', 'stop')
    temperature = _number(body, 'temperature', 1.0, 0.0, 2.0)
    top_p = _number(body, 'top_p', 1.0, 1e-6, 1.0)
    seed = body.get('seed') or 0
    if not isinstance(seed, int):
      raise BadRequest('seed must be an integer', 'seed')
    context = self.model.context(turns)
    room = self.model.config.max_len - len(context) + 1
    if room < 1:
      raise BadRequest(
          f'the messages take {len(context)} tokens; this model reads '
          f'{self.model.config.max_len} in all', 'messages',
          code='context_length_exceeded')
    key = ('max_completion_tokens' if body.get('max_completion_tokens')
           is not None else 'max_tokens')
    max_tokens = body.get(key)
    if max_tokens is None:
      max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or (
        max_tokens < 1):
      raise BadRequest(f'{key} must be a positive integer', key)
    if max_tokens > room:
      raise BadRequest(
          f'the messages take {len(context)} tokens and {key} asks for '
          f'{max_tokens}; this model reads {self.model.config.max_len} in all',
          'messages', code='context_length_exceeded')
    stream = body.get('stream', False)
    if not isinstance(stream, bool):
      raise BadRequest('stream must be true or false', 'stream')
    return Request(context, max_tokens, temperature, top_p,
                   seed % (2 ** 31)), stream

  def completion(self, request, ids, reason, used) -> dict:
    return {'id': f'chatcmpl-{uuid.uuid4().hex}', 'object': 'chat.completion',
            'created': int(time.time()), 'model': self.model.name,
            'choices': [{'index': 0, 'finish_reason': reason,
                         'message': {'role': 'assistant',
                                     'content': self.model.text(ids)}}],
            'usage': {'prompt_tokens': len(request.context),
                      'completion_tokens': used,
                      'total_tokens': len(request.context) + used}}

  def chunk_maker(self):
    cid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())

    def chunk(delta, reason):
      return {'id': cid, 'object': 'chat.completion.chunk',
              'created': created, 'model': self.model.name,
              'choices': [{'index': 0, 'delta': delta,
                           'finish_reason': reason}]}
    return chunk

  def serve_forever(self) -> None:
    self.httpd.serve_forever()

  def shutdown(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


def _number(body, key, default, low, high) -> float:
  value = body.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
      low <= value <= high):
    raise BadRequest(f'{key} must be a number from {low} to {high}', key)
  return float(value)


def serve(workdir: str, checkpoint: str | None = None, *, host: str = '127.0.0.1',
          port: int = 8000, max_batch: int = 8, system: str | None = None
          ) -> None:
  model = ChatModel(workdir, checkpoint, system=system)
  try:
    server = Server(model, host=host, port=port, max_batch=max_batch)
  except OSError as e:
    raise UserError(f'cannot listen on {host}:{port} ({e.strerror}); choose '
                    f'another --port') from None
  print(f'serving {workdir} as model {model.name!r} on {server.url} '
        f'(OpenAI-compatible: POST /v1/chat/completions, GET /v1/models); '
        f'Ctrl-C stops', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.shutdown()
