"""Sphinx extension: drop repeated inline scripts from each HTML page.

With Sphinx 7.4 and Jupyter Book 1.0.4, sphinx-thebe's and sphinx-togglebutton's inline
configuration scripts reach each page twice, at different priorities, so the page declares
``const THEBE_JS_URL`` twice and the browser throws a SyntaxError. A script is kept only
the first time its file name and attributes (the body, for inline scripts) appear. An inline
script's file name is ``None`` in one copy and ``""`` in the other, so both count as empty.
"""

from __future__ import annotations


def remove_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = getattr(script, "attributes", {})
        key = (str(getattr(script, "filename", script) or ""), tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app):
    app.connect("html-page-context", remove_repeated_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
