"""The dashboard page the ``websocket`` sink serves at ``GET /dashboard``: one self-contained page
(static/dashboard.html with the vendored uPlot inlined, no CDN) and its Content-Security-Policy.

Guaranteed: the page loads nothing but its own inline script and style (allowed by hash) and
connects only to its own origin; the feed's path is written into it as a JSON string that cannot
end the script element. Not guaranteed: anything about the records it is later fed (the page
treats them as untrusted text).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

import orjson

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def dashboard_page(feed_path: str) -> tuple[bytes, str]:
    """The dashboard as one page (static/dashboard.html with the vendored uPlot script and style
    inlined, the feed's path filled in) and its Content-Security-Policy: nothing but its own inline
    script and style (by hash) and connections to its own origin."""
    static = resources.files("memagent.plugins.sinks").joinpath("static")
    page = static.joinpath("dashboard.html").read_text("utf-8")
    uplot = static.joinpath("uPlot.iife.min.js").read_text("utf-8")
    style = static.joinpath("uPlot.min.css").read_text("utf-8")
    if "</" in uplot or "</" in style:  # would end the inline element early
        raise ValueError("the vendored uPlot files cannot be inlined")
    path = orjson.dumps(feed_path).decode().replace("<", "\\u003c")
    text = (page.replace("/*__UPLOT_CSS__*/", style).replace("/*__UPLOT_JS__*/", uplot)
            .replace('"__MEMAGENT_FEED_PATH__"', path)).encode()
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, body in _INLINE.findall(text):
        hashes[kind].append("'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'")
    policy = (f"default-src 'none'; script-src {' '.join(hashes[b'script'])}; "
              f"style-src {' '.join(hashes[b'style'])}; connect-src 'self'; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return text, policy
