"""The README's code is code: every Python block parses, and the aiohttp one builds its app."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block {i}" for i in range(len(BLOCKS))])
def test_every_python_block_parses(block: str) -> None:
    ast.parse(block)


def test_the_aiohttp_snippet_builds_an_app_that_migrates_after_connecting() -> None:
    [snippet] = [b for b in BLOCKS if "migrate_context(lambda app: app[DB]" in b]
    scope: dict[str, object] = {"__name__": "readme"}

    exec(compile(snippet, "README.md", "exec"), scope)  # builds the app; connects nothing

    contexts = list(scope["app"].cleanup_ctx)  # type: ignore[attr-defined]
    assert len(contexts) == 2
    assert contexts[0] is scope["connect"]  # connected first, then migrated
