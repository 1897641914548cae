"""The one exception type for mistakes a user can fix.

Anything a user can cause (a bad config key, a missing or misaligned corpus,
invalid UTF-8, a checkpoint from another vocabulary, no network) raises
`UserError` with a message that names the file or key and says how to fix it.
The CLI prints it as one line `error: ...` and exits with status 2.
"""


class UserError(ValueError):
  """A problem with the user's input, config or environment; the message says the fix."""


def report(error: UserError) -> int:
  """Prints `error` as the one line a command shows; the exit status, 2."""
  import sys
  print(f'error: {error}', file=sys.stderr)
  return 2
