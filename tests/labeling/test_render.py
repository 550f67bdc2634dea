"""Sanitised Markdown: model text renders as formatting, never as live HTML."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from labeling.render import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, render_content, render_markdown
from tests.labeling.xss_payloads import PAYLOADS


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def _elements(html: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    parser = _Collect()
    parser.feed(html)
    return parser.tags


def test_there_are_over_100_payloads() -> None:
    assert len(PAYLOADS) >= 100


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_renders_inert(payload: str) -> None:
    html = render_markdown(payload)
    for tag, attrs in _elements(html):
        assert tag in ALLOWED_TAGS, (tag, html)
        for name, value in attrs:
            assert name in ALLOWED_ATTRIBUTES.get(tag, set()) or (
                tag == "a" and name == "rel"), (tag, name, html)
            assert not name.startswith("on")
            if name == "href":
                assert value is not None and value.split(":", 1)[0].lower() in (
                    "http", "https", "mailto"), html
            if name == "class":
                assert value is not None and all(c.replace("-", "").isalnum()
                                                 for c in value.split()), html


def test_markdown_formatting_survives() -> None:
    html = render_markdown("**bold** and [link](https://example.com)\n\n```python\nx = 1\n```")
    assert "<strong>bold</strong>" in html
    assert '<a href="https://example.com" rel="noopener noreferrer nofollow">link</a>' in html
    assert '<span class="n">x</span>' in html  # Pygments token classes, no inline styles


def test_chat_prompt_renders_each_message_with_escaped_role() -> None:
    html = render_content([{"role": "user", "content": "hi <b>there</b>"},
                           {"role": "assistant", "content": "*hello*"}], label="Prompt")
    assert html.count('class="prefloop-msg') == 2
    assert "hi &lt;b&gt;there&lt;/b&gt;" in html and "<em>hello</em>" in html
