"""Figures of runs: learning curves from metrics.jsonl, attention heatmaps.

  transflax plot --workdir runs/a runs/b     # -> runs/a/curves.png
  transflax attention --workdir runs/m30k --text "A dog runs."
                                             # -> runs/m30k/attention_*.png

`plot_runs` overlays the runs' curves, one colour per run: train and eval
loss, learning rate, and where a run logs them BLEU, accuracy, reward and KL
(one panel each, only panels some run has data for). `attention_weights`
runs a workdir's model on one input with `mutable=['intermediates']`, so
every attention layer sows its probabilities (model/attention.py), and
returns them per kind (encoder and decoder self-attention, encoder-decoder
attention) as [layers, heads, queries, keys] with the tokens of both axes;
`plot_attention` draws them as a grid of layers x heads per kind.

matplotlib is an optional extra (pip install -e ".[plot]"); figures are drawn
with its object-oriented API, never pyplot, so nothing here changes the
backend or the open figures of a notebook that calls it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from data.errors import UserError
from model import EncoderDecoder

CURVES_FILE = 'curves.png'

# (panel title, metric keys drawn in it). Eval points are sparse: markers.
PANELS = (
    ('loss', ('train/loss', 'eval/loss')),
    ('learning rate', ('train/learning_rate',)),
    ('BLEU', ('eval/bleu',)),
    ('accuracy', ('train/accuracy', 'eval/accuracy')),
    ('reward', ('rollout/reward_mean', 'eval/reward_mean')),
    ('KL', ('rollout/kl', 'eval/kl')),
)

TITLES = {'encoder_self': 'encoder self-attention',
          'decoder_self': 'decoder self-attention (causal)',
          'cross': 'encoder-decoder attention'}


def _figure_class():
  """matplotlib's Figure (drawn with Agg when saved), or a UserError."""
  try:
    from matplotlib.figure import Figure
  except ImportError:
    raise UserError('matplotlib is not installed: pip install -e ".[plot]" '
                    '(or pip install matplotlib)') from None
  return Figure


# -- learning curves -----------------------------------------------------------

def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `workdir/metrics.jsonl`, in file order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise UserError(f'{path} not found: --workdir must be a directory that '
                    f'`transflax train` has written metrics to')
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as e:
        record = e
      if not isinstance(record, dict) or not isinstance(record.get('step'),
                                                        int):
        raise UserError(f'{path}:{number}: not a metrics record (a JSON object '
                        f'with an integer "step"): {line.strip()[:80]!r}; '
                        f'delete or mend that line')
      records.append(record)
  return records


def _series(records: list[dict[str, Any]], key: str):
  """(steps, values) of `key`, sorted by step; a step logged twice (a resumed
  run repeats the steps after its last checkpoint) keeps its last value."""
  points = {}
  for r in records:
    v = r.get(key)
    if isinstance(v, (int, float)) and math.isfinite(v):
      points[r['step']] = v
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def curves(runs: dict[str, list[dict[str, Any]]]):
  """A matplotlib Figure: one panel per entry of PANELS that some run has
  data for, each run's series in its own colour, labelled 'NAME KEY'."""
  Figure = _figure_class()
  panels = [(title, keys) for title, keys in PANELS
            if any(_series(records, k)[0] for records in runs.values()
                   for k in keys)]
  if not panels:
    raise UserError(f'no curves to draw: the metrics of {", ".join(runs)} '
                    f'hold no {", ".join(t for t, _ in PANELS)} records yet '
                    f'(a run logs every train.log_every steps)')
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(5 * cols, 3.6 * rows), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (title, keys) in zip(axes, panels):
    for color, (name, records) in enumerate(runs.items()):
      for key in keys:
        steps, values = _series(records, key)
        if steps:
          sparse = not key.startswith(('train/', 'rollout/'))
          # A series of one point (a short run) is a marker, not nothing.
          ax.plot(steps, values, color=f'C{color % 10}',
                  linestyle='--' if sparse else '-',
                  marker='o' if sparse or len(steps) == 1 else None,
                  markersize=3,
                  label=f'{name} {key}')
    ax.set_title(title)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  return fig


def _names(workdirs: list[str]) -> list[str]:
  """Each workdir's folder name; the whole path where two names collide."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return [n if names.count(n) == 1 else os.path.normpath(w)
          for n, w in zip(names, workdirs)]


def plot_runs(workdirs: list[str]) -> str:
  """Learning curves of `workdirs` overlaid, written to the first one's
  curves.png; returns that path."""
  if not workdirs:
    raise UserError('give at least one --workdir')
  _figure_class()  # fail on a missing matplotlib before reading anything
  runs = dict(zip(_names(workdirs), map(read_metrics, workdirs)))
  path = os.path.join(workdirs[0], CURVES_FILE)
  curves(runs).savefig(path, dpi=110)
  return path


# -- attention -----------------------------------------------------------------

def _pieces(tokenizer, ids) -> list[str]:
  """The text each token id adds, for axis labels: decoded in context (so a
  SentencePiece word start shows its space, as ▁), EOS as </s>."""
  out, context = [], []
  for i in map(int, ids):
    if i == tokenizer.eos_id:  # decoding stops at EOS: a new context after
      out.append('</s>')
      context = []
      continue
    before = tokenizer.decode([context])[0] if context else ''
    context.append(i)
    text = tokenizer.decode([context])[0]
    text = (text[len(before):] if text.startswith(before)
            else tokenizer.decode([[i]])[0])
    out.append(text.replace(' ', '\u2581').replace('\n', '\\n') or f'<{i}>')
  return out


def _sown(intermediates) -> dict[str, np.ndarray]:
  """kind -> [layers, heads, q, k] from the sown `attention_weights`."""
  found: dict[str, dict[int, np.ndarray]] = {}
  for path, value in traverse_util.flatten_dict(intermediates).items():
    if path[-1] != 'attention_weights':
      continue
    layer = next(int(p[len('layer_'):]) for p in path
                 if p.startswith('layer_'))
    stack = 'encoder' if 'encoder' in path else 'decoder'
    kind = 'cross' if path[-2] == 'cross_attention' else f'{stack}_self'
    found.setdefault(kind, {})[layer] = np.asarray(value[0][0], np.float32)
  return {kind: np.stack([found[kind][i] for i in sorted(found[kind])])
          for kind in TITLES if kind in found}


def attention_weights(run, params, text: str,
                      target: str | None = None) -> dict[str, dict[str, Any]]:
  """The attention probabilities of `run`'s model on one input.

  Returns kind -> {'weights': float32 [layers, heads, queries, keys],
  'queries': [str], 'keys': [str]}. Kinds: 'encoder_self', 'decoder_self'
  and 'cross' for an encoder-decoder (translation) model, which reads `text`
  as the source and `target` as the target (None: the model's own beam
  search translation); 'decoder_self' for a decoder-only model (or
  'encoder_self' for a masked LM), which reads `text` as a document does in
  training. A decoder position is labelled with the token it outputs; its
  self-attention keys with the tokens it reads (the target shifted right
  behind a start token <s>).
  """
  from train import evaluate, sampling
  tok = run.task.tokenizer
  cls = run.task.module_class
  # Attention through XLA (the weights are the same math as cuDNN's kernel),
  # no dropout, no cache.
  cfg = run.model_config.replace(deterministic=True, decode=False,
                                 attention_impl='xla', remat=False)
  cap = cfg.max_len
  # One compiled call: faster than the model's ops one by one.
  apply = jax.jit(lambda p, *args: cls(cfg).apply(
      {'params': p}, *args, mutable=['intermediates']))
  if issubclass(cls, EncoderDecoder):
    if target is None:
      target = evaluate.translate(run, params, [text])[0]
    source = tok.encode([text])[0][:cap]
    output = tok.encode([target])[0][:cap]
    _, state = apply(params, jnp.asarray([source]), jnp.asarray([output]))
    src, out = _pieces(tok, source), _pieces(tok, output)
    axes = {'encoder_self': (src, src),
            'decoder_self': (out, ['<s>'] + out[:-1]),
            'cross': (out, src)}
  else:
    start, forced = sampling.prompt_ids(tok, text)
    ids = ([start] + list(forced))[:cap]
    _, state = apply(params, jnp.asarray([ids]))
    words = _pieces(tok, ids)
    axes = {'encoder_self': (words, words), 'decoder_self': (words, words)}
  return {kind: {'weights': weights, 'queries': axes[kind][0],
                 'keys': axes[kind][1]}
          for kind, weights in _sown(state['intermediates']).items()}


def attention_figure(kind: str, entry: dict[str, Any]):
  """A matplotlib Figure: a grid of layers x heads heatmaps of one kind
  (an `attention_weights` entry), queries down, keys across, one colour
  scale from 0 to the largest weight of the figure."""
  Figure = _figure_class()
  weights, queries, keys = entry['weights'], entry['queries'], entry['keys']
  layers, heads = weights.shape[:2]
  top = float(weights.max())
  cell = max(2.2, 0.17 * max(len(queries), len(keys)) + 0.9)
  fig = Figure(figsize=(cell * heads + 1, cell * layers + 0.5),
               layout='constrained')
  axes = fig.subplots(layers, heads, squeeze=False)
  for layer in range(layers):
    for head in range(heads):
      ax = axes[layer, head]
      image = ax.imshow(weights[layer, head], vmin=0.0, vmax=top,
                        cmap='viridis', aspect='auto')
      ax.set_title(f'layer {layer} head {head}', fontsize=8)
      ax.set_xticks(range(len(keys)))
      ax.set_yticks(range(len(queries)))
      ax.set_xticklabels(keys if layer == layers - 1 else [], rotation=90,
                         fontsize=7)
      ax.set_yticklabels(queries if head == 0 else [], fontsize=7)
  fig.suptitle(TITLES.get(kind, kind))
  fig.supxlabel('key')
  fig.supylabel('query')
  fig.colorbar(image, ax=axes, shrink=0.6, label='attention weight')
  return fig


def plot_attention(workdir: str, text: str, target: str | None = None,
                   checkpoint: str | None = None) -> list[str]:
  """Attention heatmaps of `workdir`'s model on `text` (and `target`), one
  figure per kind, written to WORKDIR/attention_KIND.png; returns the paths.

  checkpoint: latest | best | average | STEP, or None for the model the run
  reported (train/runs.py:load).
  """
  _figure_class()  # fail on a missing matplotlib before loading a model
  from train import runs
  run, params = runs.load(workdir, checkpoint)
  try:
    found = attention_weights(run, params, text, target)
  finally:
    run.ckpt.close()
  paths = []
  for kind, entry in found.items():
    path = os.path.join(workdir, f'attention_{kind}.png')
    attention_figure(kind, entry).savefig(path, dpi=100)
    paths.append(path)
  return paths
