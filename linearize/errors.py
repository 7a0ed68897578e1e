"""The base of every error linearize raises for bad input or a fault it can explain.

The command line prints such an error as one line (`error: <message>`, exit status 1) instead of a
traceback; each message names the problem and the fix. A run interrupted by Ctrl-C exits with status 130.
"""

from __future__ import annotations


class LinearizeError(Exception):
    """Bad input or an explained fault: the message says what is wrong and what to do."""

    exit_status = 1


class Interrupted(LinearizeError):
    """Ctrl-C (SIGINT): the message says where the run stopped and where a rerun resumes."""

    exit_status = 130
