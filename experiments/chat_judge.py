r"""Judge the chat recipe's runs from outside and draw the reward-vs-KL frontier.

  python -m experiments.chat_judge runs/chat_sft runs/chat_ppo runs/chat_grpo \
      runs/chat_dpo --plot docs/figures/chat_frontier.png

Each workdir is judged once (`transflax judge`, train/judge.py: VADER
positivity, SmolLM2-135M perplexity and the KL to the SFT model, on replies
to chitchat's held-out test openings at temperature 1); its numbers go to
its results.json and are reused on later calls (--rejudge to redo). Prints
docs/chat.md's table (positivity and perplexity also as the change from the
first workdir, the SFT model) and, with --plot, writes the DPO paper's Figure 2
shape: positivity against KL, one line per algorithm over its betas, and
the replies' perplexity against KL beside it (needs matplotlib: pip install
-e ".[plot]").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data import errors
from data.errors import UserError


def describe(workdir: str) -> tuple[str, float | None]:
  """(method, beta) of a chat workdir from its config.json."""
  with open(os.path.join(workdir, 'config.json')) as f:
    c = json.load(f)
  task = c['task']
  if task == 'dpo':
    human = c['data']['corpus'] == 'sentiment'
    return ('DPO (human pairs)' if human else 'DPO'), c['dpo']['beta']
  if task in ('ppo', 'grpo'):
    return task.upper(), c['rl']['kl_coef']
  return task.upper(), None


def judged(workdir: str, rejudge: bool, **options) -> dict:
  path = os.path.join(workdir, 'results.json')
  if not rejudge and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f).get('judge')
    if saved and all(saved.get(k) == v for k, v in options.items()
                     if k != 'num_prompts') and saved.get(
                         'num_prompts_limit') == options.get('num_prompts'):
      return saved
  from train import judge
  return judge.judge(workdir, **options)


def table(rows: list[tuple[str, str, float | None, dict]]) -> str:
  base = rows[0][3]
  out = ['| run | beta | VADER positivity | vs SFT | SmolLM2 perplexity | '
         'vs SFT | KL to SFT (nats/reply) | our reward model | reply tokens |',
         '|---|---|---|---|---|---|---|---|---|']
  for workdir, method, beta, r in rows:
    ppl = r.get('fluency_ppl', float('nan'))
    out.append(
        f'| {method} `{workdir}` | {"" if beta is None else beta} | '
        f'{r["positivity"]:.3f} ± {r["positivity_sem"]:.3f} | '
        f'{r["positivity"] - base["positivity"]:+.3f} | {ppl:.1f} | '
        f'{100 * (ppl / base.get("fluency_ppl", ppl) - 1):+.0f}% | '
        f'{r["kl"]:.2f} ± {r["kl_sem"]:.2f} | '
        f'{r.get("reward_mean", float("nan")):.2f} | '
        f'{r["reply_tokens"]:.1f} |')
  return '\n'.join(out)


def plot(rows, path: str) -> None:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    raise UserError('--plot needs matplotlib: pip install -e ".[plot]"') from None
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  methods = {}
  for _, method, beta, r in rows:
    methods.setdefault(method, []).append((r['kl'], r, beta))
  markers = {'SFT': 'k*', 'PPO': 'o-', 'GRPO': 's-', 'DPO': '^-',
             'DPO (human pairs)': 'v--'}
  for method, points in methods.items():
    points.sort(key=lambda p: p[0])
    kl = [p[0] for p in points]
    style = markers.get(method, 'x-')
    left.plot(kl, [p[1]['positivity'] for p in points], style, label=method,
              markersize=9 if method == 'SFT' else 6)
    right.plot(kl, [p[1].get('fluency_ppl', float('nan')) for p in points],
               style, label=method, markersize=9 if method == 'SFT' else 6)
    for x, r, beta in points:
      if beta is not None:
        left.annotate(f'β={beta:g}', (x, r['positivity']), fontsize=7,
                      xytext=(4, -9), textcoords='offset points')
  left.set(xlabel='KL(policy || SFT), nats per reply',
           ylabel='VADER positivity of replies (−1..1)',
           title='Held-out positivity vs KL')
  right.set(xlabel='KL(policy || SFT), nats per reply',
            ylabel='SmolLM2-135M perplexity of replies',
            title='Fluency vs KL (lower is better)')
  sft = [r for _, m, _, r in rows if m == 'SFT']
  if sft and 'fluency_ppl' in sft[0]:
    right.axhline(1.2 * sft[0]['fluency_ppl'], color='gray', lw=0.8, ls=':',
                  label='SFT + 20%')
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('workdirs', nargs='+', help='the SFT run first')
  p.add_argument('--plot', help='write the frontier PNG here')
  p.add_argument('--rejudge', action='store_true')
  p.add_argument('--reward_model', default='runs/chat_reward')
  p.add_argument('--fluency_model', default='runs/smollm2')
  p.add_argument('--num_prompts', type=int, default=160,
                 help='the first N held-out prompts that fit (0 = all)')
  args = p.parse_args(argv)
  try:
    rows = []
    for workdir in args.workdirs:
      r = judged(workdir, args.rejudge, reward_model=args.reward_model,
                 fluency_model=args.fluency_model,
                 num_prompts=args.num_prompts)
      method, beta = describe(workdir)
      rows.append((workdir, method, beta, r))
      print(json.dumps({k: v for k, v in r.items() if k != 'samples'}),
            flush=True)
    print(table(rows))
    if args.plot:
      plot(rows, args.plot)
  except UserError as e:
    return errors.report(e)
  return 0


if __name__ == '__main__':
  sys.exit(main())
