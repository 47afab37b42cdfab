"""The one error type of spinbox.net: a sentence a user understands."""

from __future__ import annotations


class NetworkError(Exception):
    """A VM's network could not be set up or torn down; str() says why."""
