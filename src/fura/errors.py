"""The one base class for "what was given is wrong" (a path, a config, a data file, an adapter).

Raising a :class:`UserError` (or a subclass) marks a mistake the user can fix, as opposed to a bug in
fura: the ``fura`` command prints it as one line on stderr and exits with status 2, with no traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message names the file, record or knob and says how to fix it."""
