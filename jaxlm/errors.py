"""The one error type jaxlm raises for bad input (config keys, files, parameter shapes).

Command-line entry points turn it into a single line on stderr and exit code 2.
"""


class UsageError(ValueError):
  """Bad input from the user: the message names the key, file or parameter at fault."""
