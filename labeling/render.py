"""Model text -> safe HTML: Markdown rendered with raw HTML disabled, then sanitised.

Completions and prompts are untrusted. Two layers keep them inert: markdown-it renders with
`html=False` (a `<script>` or `<img onerror=...>` in the text comes out as visible text) and
refuses `javascript:`-style links; nh3 (the Rust `ammonia` sanitiser) then keeps only an
allow-list of tags, attributes and URL schemes. Code blocks are highlighted by Pygments into
`<span class=...>` (styled by `CODE_CSS`), so no inline style or script is ever emitted.

    >>> render_markdown("<img src=x onerror=alert(1)> **hi**")
    '<p>&lt;img src=x onerror=alert(1)&gt; <strong>hi</strong></p>\\n'
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Any

import nh3
from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "span", "blockquote",
    "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6", "a",
    "table", "thead", "tbody", "tr", "th", "td",
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"}, "span": {"class"}, "code": {"class"}, "pre": {"class"},
    "ol": {"start"}, "th": {"style"}, "td": {"style"},
}
URL_SCHEMES = {"http", "https", "mailto"}
# Pygments token classes ("k", "nf", "s2", ...) and "language-<name>" on fenced code.
SAFE_CLASS = re.compile(r"^(?:[a-z][a-z0-9]{0,3}|language-[A-Za-z0-9_+-]{1,30})$")
CODE_CSS = HtmlFormatter(style="default").get_style_defs(".prefloop-md pre")


def _highlight(code: str, lang: str, _attrs: Any) -> str:
    try:
        lexer = get_lexer_by_name(lang.strip()) if lang.strip() else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return html.escape(code)
    return highlight(code, lexer, HtmlFormatter(nowrap=True))


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight, "breaks": True})
    return md.enable(["table", "strikethrough"])


def _filter_attribute(_tag: str, name: str, value: str) -> str | None:
    # Untrusted text can name the language of a fence, i.e. the class of the code element;
    # keep only class names of the two shapes the renderer makes.
    if name == "class":
        kept = [c for c in value.split() if SAFE_CLASS.match(c)]
        return " ".join(kept) or None
    return value


def render_markdown(text: str) -> str:
    """Sanitised HTML for untrusted Markdown."""
    rendered = _markdown().render(text)
    return nh3.clean(rendered, tags=ALLOWED_TAGS, attributes=ALLOWED_ATTRIBUTES,
                     url_schemes=URL_SCHEMES, link_rel="noopener noreferrer nofollow",
                     attribute_filter=_filter_attribute,
                     # th/td alignment from tables is the only style markdown-it emits
                     filter_style_properties={"text-align"})


def render_content(content: str | list[dict[str, str]] | list[Any], *, label: str = "") -> str:
    """A prompt or completion as HTML: plain text, or a chat rendered message by message."""
    if isinstance(content, str):
        body = render_markdown(content)
        title = f'<div class="prefloop-title">{html.escape(label)}</div>' if label else ""
        return f'<div class="prefloop-md">{title}{body}</div>'
    parts = []
    for message in content:
        role = message["role"] if isinstance(message, dict) else message.role
        text = message["content"] if isinstance(message, dict) else message.content
        parts.append(f'<div class="prefloop-msg prefloop-{html.escape(role)}">'
                     f'<div class="prefloop-role">{html.escape(role)}</div>'
                     f'{render_markdown(text)}</div>')
    title = f'<div class="prefloop-title">{html.escape(label)}</div>' if label else ""
    return f'<div class="prefloop-md prefloop-chat">{title}{"".join(parts)}</div>'
