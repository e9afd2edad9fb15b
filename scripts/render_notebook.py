#!/usr/bin/env python
"""Execute a notebook in a real Jupyter kernel and write it as one self-contained HTML page.

    python scripts/render_notebook.py NOTEBOOK.ipynb [--out OUT.html] [--executed OUT.ipynb] [--timeout 600]

- Runs every cell headless through nbclient with the `python3` kernel of the Python running this script (its
  virtualenv), in the notebook's own folder. `--timeout` is per cell, in seconds.
- The page opens offline: markdown, highlighted code and outputs; plotly charts
  (`application/vnd.plotly.v1+json`, as last updated through their display_id) are drawn by plotly.js, inlined
  once in the page head (only when the notebook has a chart); HTML outputs are kept as they are; local and
  attached markdown images are inlined as data URIs.
- Cell directives as in nbdev/Quarto are honoured: `#| hide` or `#| include: false` (drop the cell),
  `#| echo: false` (drop the code, keep the outputs), `#| output: false` (drop the outputs); also the cell tags
  `remove-cell`, `remove-input`, `remove-output`.
- When a cell fails (or runs past the timeout, or the kernel dies) the notebook's own error is printed and the
  exit status is 1; the page and the executed notebook are still written, with the outputs up to that cell.

Needs nbclient, nbformat, ipykernel, markdown-it-py, pygments and (for charts) plotly.
"""
from __future__ import annotations

import argparse
import atexit
import base64
import html
import json
import mimetypes
import os
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][A-Z0-9]")


# ----------------------------------------------------------------------------------------------------------------
# Execution

class CellFailure(Exception):
    """A cell raised, timed out, or its kernel died; `message` is what to show the user."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _kernel_manager_class():
    """A kernel manager whose `python3` is ipykernel on this interpreter, whatever kernelspecs the user has."""
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonSpecs(KernelSpecManager):
        def get_kernel_spec(self, kernel_name, *args, **kwargs):
            if kernel_name == "python3":
                return KernelSpec(resource_dir=RESOURCES, **get_kernel_dict())
            return super().get_kernel_spec(kernel_name, *args, **kwargs)

    class ThisPythonKernel(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _specs(self):
            return ThisPythonSpecs(data_dir=self.data_dir)

    return ThisPythonKernel


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _source(cell) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _error_message(nb, index: int, nb_path: Path, fallback: str, use_output: bool = True) -> str:
    cell = nb.cells[index]
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"] if use_output else []
    src = _source(cell).rstrip("\n").splitlines()
    shown = "\n".join(f"    {line}" for line in src[:15]) + ("\n    ..." if len(src) > 15 else "")
    head = f"{nb_path}: cell {index + 1} of {len(nb.cells)} failed:\n{shown}\n"
    if errors:
        err = errors[-1]
        tb = _strip_ansi("\n".join(err.get("traceback") or [])).strip()
        return head + "\n" + (tb or f"{err.get('ename')}: {err.get('evalue')}")
    return head + "\n" + fallback


def execute_notebook(nb_path: Path, timeout: int = 600):
    """Execute the notebook at `nb_path`; return (executed notebook, None) or (partly executed notebook, message)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(str(nb_path), as_version=4)
    current = {"index": -1}

    def on_cell_start(cell, cell_index, **_):
        current["index"] = cell_index

    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # quiets the debugger's frozen-modules warning
    client = NotebookClient(
        nb, kernel_manager_class=_kernel_manager_class(), kernel_name="python3", timeout=timeout,
        startup_timeout=120, allow_errors=False, record_timing=False, on_cell_start=on_cell_start,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # the kernel's own start-up chatter, not cell output
        resources={"metadata": {"path": str(nb_path.parent)}})
    kernel_log = tempfile.TemporaryFile()  # the kernel process's own stderr: shown only when the kernel fails

    def log_tail() -> str:
        kernel_log.seek(0)
        text = _strip_ansi(kernel_log.read().decode(errors="replace")).strip()
        return f"\nkernel log:\n{text[-3000:]}" if text else ""

    try:
        client.execute(stderr=kernel_log)
    except CellTimeoutError:
        return nb, _error_message(nb, current["index"], nb_path,
                                  f"the cell ran longer than --timeout {timeout} s and was stopped", use_output=False)
    except CellExecutionError as e:
        return nb, _error_message(nb, current["index"], nb_path, f"{e.ename}: {e.evalue}")
    except DeadKernelError:
        return nb, _error_message(nb, current["index"], nb_path, "the kernel died while running this cell",
                                  use_output=False) + log_tail()
    except RuntimeError as e:  # kernel failed to start, etc.
        return nb, f"{nb_path}: could not run the notebook: {e}" + log_tail()
    finally:  # the kernel is shut down by now; nbclient's own exit hook would only add noise after a failed start
        atexit.unregister(client._cleanup_kernel)
        kernel_log.close()
    return nb, None


# ----------------------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { margin: 0; background: #fff; color: #1f2328; font: 15px/1.55 -apple-system, BlinkMacSystemFont, "Segoe UI",
       Helvetica, Arial, sans-serif; }
main.nb { max-width: 1100px; margin: 0 auto; padding: 24px 28px 64px; }
.cell { margin: 14px 0; }
.md h1, .md h2, .md h3 { line-height: 1.25; margin: 1.1em 0 .5em; }
.md code { background: #f3f4f6; padding: .1em .3em; border-radius: 4px; font-size: 90%; }
.md pre code { background: none; padding: 0; }
.md table { border-collapse: collapse; } .md th, .md td { border: 1px solid #d0d7de; padding: 4px 10px; }
.md img { max-width: 100%; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.input { display: flex; }
.prompt { flex: 0 0 64px; color: #6e7781; font: 12px/1.9 ui-monospace, monospace; text-align: right;
          padding-right: 8px; }
.prompt.out { color: #b35900; }
.src { flex: 1; min-width: 0; background: #f6f8fa; border: 1px solid #e1e4e8; border-radius: 4px; overflow-x: auto; }
.src pre, .md pre { margin: 0; padding: 8px 10px; font-size: 13px; line-height: 1.45; }
.md pre { background: #f6f8fa; border-radius: 4px; overflow-x: auto; }
.output { display: flex; margin-top: 4px; }
.output > .body { flex: 1; min-width: 0; overflow-x: auto; }
.output pre { margin: 0; padding: 2px 0; font-size: 13px; white-space: pre-wrap; word-break: break-word; }
.output .stderr { background: #fff5f5; }
.output .error { background: #fff0f0; color: #8b0000; padding: 6px; }
.output img { max-width: 100%; }
.widget-note { color: #6e7781; font-style: italic; font-size: 13px; }
.plotly-graph-div { width: 100%; }
"""


def _code_html(code: str, language: str) -> str:
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import TextLexer, get_lexer_by_name
    try:
        lexer = get_lexer_by_name(language or "python")
    except Exception:
        lexer = TextLexer()
    return highlight(code, lexer, HtmlFormatter(nowrap=False, cssclass="highlight"))


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter().get_style_defs(".highlight")


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt
    md = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    return md.render(text)


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _inline_images(html_text: str, attachments: dict, base_dir: Path) -> str:
    """Markdown images from cell attachments or local files become data URIs, so the page stays one file."""
    def repl(m):
        url = html.unescape(m.group(2))
        if url.startswith("attachment:"):
            bundle = attachments.get(url[len("attachment:"):]) or {}
            for mime, data in bundle.items():
                if mime.startswith("image/"):
                    raw = data.encode() if mime == "image/svg+xml" else base64.b64decode(data)
                    return f'{m.group(1)}"{_data_uri(mime, raw)}"'
            return m.group(0)
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//|^#", url):
            return m.group(0)  # has a scheme (http:, data:, ...) or is an anchor
        path = (base_dir / url.split("#")[0].split("?")[0])
        if path.is_file():
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            return f'{m.group(1)}"{_data_uri(mime, path.read_bytes())}"'
        return m.group(0)
    return re.sub(r'(<img\b[^>]*?\ssrc=)"([^"]*)"', repl, html_text)


def _stream_text(text: str) -> str:
    """Apply carriage returns the way a terminal would (progress bars), drop ANSI escapes."""
    lines = []
    for line in _strip_ansi(text).split("\n"):
        lines.append(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r"))
    return "\n".join(lines)


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _json_for_script(obj) -> str:
    # Valid JSON that cannot close the <script> element it sits in.
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e") \
        .replace("&", "\\u0026").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _plotly_html(fig: dict) -> str:
    div_id = f"plotly-{uuid.uuid4().hex[:12]}"
    fig = dict(fig)
    config = {"responsive": True, **(fig.pop("config", None) or {})}
    height = (fig.get("layout") or {}).get("height") or 450
    payload = {"data": fig.get("data", []), "layout": fig.get("layout", {}), "config": config}
    if fig.get("frames"):
        payload["frames"] = fig["frames"]
    return (f'<div id="{div_id}" class="plotly-graph-div" style="height:{int(height)}px"></div>\n'
            f'<script type="application/json" id="{div_id}-fig">{_json_for_script(payload)}</script>\n'
            f'<script>Plotly.newPlot("{div_id}", JSON.parse(document.getElementById("{div_id}-fig").textContent));'
            f'</script>')


def _coalesced(outputs: list) -> list:
    """Consecutive stream outputs of one stream joined into one, as a notebook front end shows them: a reply streamed
    token by token arrives as many small outputs and would otherwise be drawn as one block (a line) per token."""
    out = []
    for o in outputs:
        if (o.get("output_type") == "stream" and out and out[-1].get("output_type") == "stream"
                and out[-1].get("name") == o.get("name")):
            out[-1] = {**out[-1], "text": _joined(out[-1].get("text", "")) + _joined(o.get("text", ""))}
        else:
            out.append(o)
    return out


def _output_html(out, base_dir: Path) -> tuple[str, bool]:
    """HTML for one output; second item: whether it needs plotly.js."""
    kind = out.get("output_type")
    if kind == "stream":
        cls = "stderr" if out.get("name") == "stderr" else "stdout"
        return f'<pre class="{cls}">{html.escape(_stream_text(_joined(out.get("text", ""))))}</pre>', False
    if kind == "error":
        tb = _strip_ansi("\n".join(out.get("traceback") or [])) or f"{out.get('ename')}: {out.get('evalue')}"
        return f'<pre class="error">{html.escape(tb)}</pre>', False
    data = out.get("data", {})
    if PLOTLY_MIME in data:
        fig = data[PLOTLY_MIME]
        if isinstance(fig, str):
            fig = json.loads(fig)
        return _plotly_html(fig), True
    if "text/html" in data:
        return f'<div class="html">{_joined(data["text/html"])}</div>', False
    if "image/svg+xml" in data:
        return f'<div class="svg">{_joined(data["image/svg+xml"])}</div>', False
    for mime in ("image/png", "image/jpeg", "image/gif", "image/webp"):
        if mime in data:
            b64 = _joined(data[mime]).replace("\n", "")
            return f'<img src="data:{mime};base64,{b64}" alt="">', False
    if "text/markdown" in data:
        return f'<div class="md">{_inline_images(_markdown(_joined(data["text/markdown"])), {}, base_dir)}</div>', False
    if WIDGET_MIME in data:
        return '<div class="widget-note">(interactive widget: run the notebook in Jupyter to see it)</div>', False
    if "text/latex" in data:
        return f'<pre class="latex">{html.escape(_joined(data["text/latex"]))}</pre>', False
    if "application/json" in data:
        return f'<pre class="json">{html.escape(json.dumps(data["application/json"], indent=1))}</pre>', False
    if "text/plain" in data:
        return f'<pre class="text">{html.escape(_strip_ansi(_joined(data["text/plain"])))}</pre>', False
    return "", False


_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def _directives(src: str) -> tuple[dict, str]:
    """Leading `#| key: value` / `#| flag` lines of a code cell, and the source without them."""
    found, lines = {}, src.splitlines()
    i = 0
    while i < len(lines):
        m = _DIRECTIVE.match(lines[i])
        if m:
            found[m.group(1).lower()] = m.group(2).lower() or "true"
        elif lines[i].strip():
            break
        i += 1
    return found, "\n".join(lines[i:]) if found else src


def notebook_html(nb, nb_path: Path, title: str | None = None) -> str:
    """The whole page for an (executed) notebook."""
    base_dir = nb_path.parent
    language = ((nb.metadata.get("language_info") or {}).get("name")
                or (nb.metadata.get("kernelspec") or {}).get("language") or "python")
    parts, needs_plotly = [], False
    for cell in nb.cells:
        src = _source(cell)
        tags = set((cell.get("metadata") or {}).get("tags") or [])
        if "remove-cell" in tags:
            continue
        if cell.cell_type == "markdown":
            body = _inline_images(_markdown(src), cell.get("attachments") or {}, base_dir)
            parts.append(f'<div class="cell md">{body}</div>')
            if title is None:
                m = re.search(r"^#\s+(.+)$", src, re.M)
                title = m and m.group(1).strip()
            continue
        if cell.cell_type == "raw":
            mime = (cell.get("metadata") or {}).get("raw_mimetype") or (cell.get("metadata") or {}).get("format")
            parts.append(f'<div class="cell raw">{src}</div>' if mime == "text/html"
                         else f'<div class="cell raw"><pre>{html.escape(src)}</pre></div>')
            continue
        flags, code = _directives(src)
        if flags.get("hide") == "true" or flags.get("include") == "false":
            continue
        show_input = flags.get("echo") != "false" and "remove-input" not in tags and "hide_input" not in flags
        show_output = flags.get("output") != "false" and "remove-output" not in tags and "hide_output" not in flags
        count = cell.get("execution_count")
        prompt = f"[{count}]:" if count else "[ ]:"
        cell_parts = []
        if show_input and code.strip():
            cell_parts.append(f'<div class="input"><div class="prompt">In {prompt}</div>'
                              f'<div class="src">{_code_html(code, language)}</div></div>')
        if show_output:
            for out in _coalesced(cell.get("outputs", [])):
                body, plotly = _output_html(out, base_dir)
                needs_plotly |= plotly
                if body:
                    label = f"Out {prompt}" if out.get("output_type") == "execute_result" else ""
                    cell_parts.append(f'<div class="output"><div class="prompt out">{label}</div>'
                                      f'<div class="body">{body}</div></div>')
        if cell_parts:
            parts.append('<div class="cell code">' + "\n".join(cell_parts) + "</div>")
    head_js = ""
    if needs_plotly:
        from plotly.offline import get_plotlyjs
        js = get_plotlyjs()
        if "</script" in js.lower():  # cannot happen with plotly.min.js; guard the page anyway
            js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.I)
        head_js = f'<script>window.PlotlyConfig = {{MathJaxConfig: "local"}};</script>\n<script>{js}</script>'
    title = html.escape(title or nb_path.stem)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{title}</title>\n'
            f'<style>{_CSS}\n{_pygments_css()}</style>\n{head_js}\n</head>\n<body>\n<main class="nb">\n'
            + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Execute a notebook headless and write it as one offline HTML page.")
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--out", type=Path, help="HTML page to write (default: next to the notebook, .html)")
    ap.add_argument("--executed", type=Path, help="also save the executed notebook here")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = ap.parse_args(argv)

    nb_path = args.notebook.resolve()
    if not nb_path.is_file():
        print(f"render_notebook: no such notebook: {args.notebook}", file=sys.stderr)
        return 2
    out = (args.out or nb_path.with_suffix(".html")).resolve()

    t0 = time.monotonic()
    nb, failure = execute_notebook(nb_path, timeout=args.timeout)
    elapsed = time.monotonic() - t0

    import nbformat
    if args.executed:
        args.executed.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(args.executed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(notebook_html(nb, nb_path), encoding="utf-8")

    if failure:
        print(failure, file=sys.stderr)
        partial = f"{out}" + (f" and {args.executed}" if args.executed else "")
        print(f"\nrender_notebook: FAILED after {elapsed:.1f}s; the outputs so far are in {partial}",
              file=sys.stderr)
        return 1
    print(f"rendered {nb_path.name} in {elapsed:.1f}s -> {out}"
          + (f" (executed notebook: {args.executed})" if args.executed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
