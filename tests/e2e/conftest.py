"""Fixtures of the end-to-end tests that need more than tests/conftest.py: a browser."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, async_playwright

from tests.support.web import CHROMIUM, CHROMIUM_ARGS, need_chromium


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Debian's headless Chromium, driven by Playwright (never Playwright's own download)."""
    need_chromium()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            yield b
        finally:
            await b.close()
