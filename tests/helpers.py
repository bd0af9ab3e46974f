"""Kept only for test modules that still ``import helpers``: everything lives in the ``testkit`` package.

Write ``import testkit as tk`` instead; this module goes once nothing imports it.
"""
from __future__ import annotations

from testkit import *
from testkit import __all__  # noqa: F401
