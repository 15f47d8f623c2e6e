"""The package's error base class.

Errors a user can cause and fix (bad file, bad label, missing folder, bad config) derive
from :class:`HisynsegError`; the CLI prints their message as one line and exits 2.
"""


class HisynsegError(Exception):
    """Base class of errors caused by input, reported without a traceback."""
