"""The builder's one failure: a sentence naming what is missing and how to get it."""

from __future__ import annotations


class BuildError(Exception):
    pass
