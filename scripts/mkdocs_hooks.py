"""MkDocs hook: render the Sphinx roles of maskpatch's docstrings as code (and links where possible).

The docstrings use ``:class:`X```-style roles, which mkdocstrings leaves as literal text. After a page
is rendered, ``:role:<code>X</code>`` becomes ``<code>X</code>``, linked to the object's anchor when
the same page documents ``maskpatch.X``.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>~?([\w.]+)</code>")


def on_page_content(html: str, **kwargs: object) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        target = name if name.startswith("maskpatch.") else f"maskpatch.{name}"
        if f'id="{target}"' in html:
            return f'<a href="#{target}"><code>{name}</code></a>'
        return f"<code>{name}</code>"

    return _ROLE.sub(replace, html)
