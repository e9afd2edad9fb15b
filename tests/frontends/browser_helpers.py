"""Test helpers for notebook rendering and the real-browser checks.

- `write_synthetic_notebook`: a small notebook with the two kinds of rich output ftlab's notebooks produce:
  a live plotly chart sent as a raw MIME bundle (displayed, then updated through its display_id) and a
  label-mask view (HTML token spans with inline background colours, one of them inside <details>).
- `Chromium`: headless Chromium driven through the DevTools protocol over the pipe that
  `--remote-debugging-pipe` opens (file descriptors 3 and 4), so no websocket library, port or driver is needed.
- `JupyterLab`: a JupyterLab server on a free localhost port with a token and a throwaway root folder.
- `check_page`: open a page (JupyterLab or the offline page) and report what rendered (plots, traces, token
  spans and their computed colours), with a screenshot; `inspect_in_jupyterlab` does it all for one notebook.

Run directly to check any executed notebook in JupyterLab:
    python tests/frontends/browser_helpers.py EXECUTED.ipynb --screenshot shot.png
"""
from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FTLAB_ARTIFACTS") or ROOT / "tests" / "artifacts")

# ----------------------------------------------------------------------------------------------------------------
# The synthetic notebook

PLOTLY_MIME = "application/vnd.plotly.v1+json"
LOSS_FIRST = [2.5, 2.1, 1.9]
LOSS_FINAL = [2.5, 2.1, 1.9, 1.7, 1.55, 1.42, 1.33, 1.27]
LR_VALUES = [0.0, 1e-4, 2e-4, 2e-4, 1.5e-4, 1e-4]
MASK_COLOURS = {"trained": "#c8f7c5", "masked": "#e6e6e6", "special": "#fde2b8"}
MASK_TOKENS = [("<|im_start|>", "special"), ("user", "masked"), ("\n", "masked"), ("What is 2+3?", "masked"),
               ("<|im_end|>", "special"), ("\n", "masked"), ("<|im_start|>", "special"), ("assistant", "masked"),
               ("\n", "masked"), ("2+3", "trained"), (" = 5", "trained"), ("<|im_end|>", "trained")]
N_TRAINED_PER_VIEW = sum(kind == "trained" for _, kind in MASK_TOKENS)
N_MASK_VIEWS = 2  # one plain, one inside <details>

_CHART_CELL = r'''import numpy as np
import plotly.graph_objects as go
from IPython.display import display, update_display

def plain(obj):
    "numpy arrays and scalars left in the figure dict to lists and numbers, so the bundle is plain JSON"
    if isinstance(obj, dict): return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)): return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray): return obj.tolist()
    if isinstance(obj, np.generic): return obj.item()
    return obj

def chart_bundle(y, title, name, as_numpy):
    # plotly 7's to_plotly_json() writes numpy arrays as base64 typed arrays ({"dtype", "bdata"}), lists as lists;
    # plotly.js decodes both. The loss chart takes the first way, the learning-rate chart the second.
    x = np.arange(1, len(y) + 1) if as_numpy else list(range(1, len(y) + 1))
    y = np.asarray(y) if as_numpy else list(y)
    fig = go.Figure(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(title=title, height=320, margin=dict(l=50, r=20, t=50, b=40),
                      xaxis_title="step", yaxis_title=name)
    return {"application/vnd.plotly.v1+json": plain(fig.to_plotly_json()),
            "text/html": f"<div class='ftlab-chart-fallback'>{title}: {len(y)} points</div>",
            "text/plain": f"<ftlab chart: {title}, {len(y)} points>"}

handle = display(chart_bundle(LOSS_FIRST, "train loss (step 3)", "loss", as_numpy=True), raw=True,
                 display_id="ftlab-loss")
'''

_UPDATE_CELL = r'''update_display(chart_bundle(LOSS_FINAL, "train loss (step 8)", "loss", as_numpy=True), raw=True,
               display_id="ftlab-loss")
display(chart_bundle(LR_VALUES, "learning rate", "lr", as_numpy=False), raw=True, display_id="ftlab-lr")
print("trained", len(LOSS_FINAL), "steps")
'''

_MASK_CELL = r'''import html
from IPython.display import HTML

def mask_view(tokens):
    spans = "".join(
        f'<span class="ftlab-tok ftlab-{kind}" style="background:{MASK_COLOURS[kind]};border-radius:3px;'
        f'padding:0 1px" title="{kind}">{html.escape(text)}</span>' for text, kind in tokens)
    return f'<div class="ftlab-mask" style="font-family:monospace;white-space:pre-wrap;line-height:1.6">{spans}</div>'

display(HTML(mask_view(MASK_TOKENS)))
display(HTML("<details open><summary>sample 2 (trained tokens in green)</summary>" + mask_view(MASK_TOKENS)
             + "</details>"))
'''

# Variants of the same coloured span, to see what JupyterLab's sanitizer keeps for untrusted output.
SANITIZER_PROBES = {
    "background-shorthand-hex": "background:#c8f7c5",
    "background-color-hex": "background-color:#c8f7c5",
    "background-rgba": "background:rgba(46, 160, 67, 0.35)",
    "background-rgb-modern": "background:rgb(46 160 67 / 35%)",
    "background-hsl": "background:hsl(120, 60%, 85%)",
    "background-named": "background:lightgreen",
    "background-var": "background:var(--jp-success-color3, #c8f7c5)",
    "background-important": "background:#c8f7c5 !important",
    "mixed-valid-and-invalid": "background:hsl(120, 60%, 85%);border-radius:3px;color:#111",
    "full-token-style": "background:#c8f7c5;color:#111;border-radius:3px;padding:0 1px;border-bottom:2px solid #2ea043",
}

_PROBE_CELL = r'''from IPython.display import HTML
probes = %r
parts = [f'<span class="ftlab-probe probe-{name}" style="{style}" data-token-id="7">{name}</span> '
         for name, style in probes.items()]
parts.append('<style>.probe-style-tag { background: #ff0000; }</style>'
             '<span class="ftlab-probe probe-style-tag">style-tag</span> ')
parts.append('<span class="ftlab-probe probe-title" title="token 7">title-attr</span>')
parts.append('<details class="ftlab-probe probe-details"><summary>summary</summary>inside</details>')
parts.append('<script>document.title = "probe-script-ran"</script>')
display(HTML("".join(parts)))
''' % (SANITIZER_PROBES,)


def write_synthetic_notebook(path: Path, sanitizer_probe: bool = False, failing: bool = False) -> Path:
    """Write the synthetic notebook (unexecuted) to `path`."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    consts = (f"LOSS_FIRST = {LOSS_FIRST!r}\nLOSS_FINAL = {LOSS_FINAL!r}\nLR_VALUES = {LR_VALUES!r}\n"
              f"MASK_COLOURS = {MASK_COLOURS!r}\nMASK_TOKENS = {MASK_TOKENS!r}")
    cells = [
        new_markdown_cell("# Synthetic ftlab notebook\n\nA **live chart** and a *label mask* view.\n\n"
                          "| output | mimetype |\n|---|---|\n| chart | `application/vnd.plotly.v1+json` |\n"
                          "| mask | `text/html` |"),
        new_code_cell(consts),
        new_code_cell(_CHART_CELL),
        new_markdown_cell("The next cell updates the loss chart above through its `display_id`."),
        new_code_cell(_UPDATE_CELL),
        new_code_cell(_MASK_CELL),
    ]
    if sanitizer_probe:
        cells.append(new_code_cell(_PROBE_CELL))
    if failing:
        cells.append(new_code_cell("def load_rows(n):\n    return rows[:n]\n\nload_rows(3)"))
        cells.append(new_code_cell("print('never runs')"))
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Processes

def find_chromium() -> str | None:
    env = os.environ.get("FTLAB_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc, children first-level to leaves)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Stop a process started with start_new_session=True: its process group and every descendant (kernels and
    browser helpers may sit in groups of their own)."""
    pids = _descendants(proc.pid)
    if proc.poll() is None:
        _quietly(os.killpg, proc.pid, signal.SIGTERM)
        _quietly(proc.wait, grace)
    _quietly(os.killpg, proc.pid, signal.SIGKILL)
    for pid in pids:
        _quietly(os.kill, pid, signal.SIGKILL)
    _quietly(proc.wait, grace)


def _quietly(fn, *args) -> None:
    "Call fn; a process that is already gone, or does not exit in time, is not an error while cleaning up."
    try:
        fn(*args)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------------------------------------
# Chromium over the DevTools pipe

class BrowserError(RuntimeError):
    pass


def _high_fd(fd: int) -> int:
    import fcntl
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class _Spawned:
    """The bits of subprocess.Popen that kill_tree needs, for a process started with os.posix_spawn."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = -1
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode


class Chromium:
    """Headless Chromium, one page, commands over the DevTools protocol on fds 3 (to Chromium) and 4 (from it)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
             "--disable-breakpad", "--disable-crash-reporter", "--remote-debugging-pipe"]

    def __init__(self, executable: str, workdir: Path, width: int = 1280, height: int = 1600):
        self.workdir, self.width, self.height = Path(workdir), width, height
        self.log = self.workdir / "chromium.log"
        profile = self.workdir / "chromium-profile"
        profile.mkdir(parents=True, exist_ok=True)
        # Pipe ends at fd numbers >= 10, so that dup2 onto 0-4 in the child never meets one of them.
        to_child_r, to_child_w, from_child_r, from_child_w = (_high_fd(fd) for pair in (os.pipe(), os.pipe())
                                                              for fd in pair)

        argv = [executable, *self.FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "about:blank"]
        log = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:  # posix_spawn places the pipe ends on fds 3 and 4 without running Python code in the child
            self.proc = _Spawned(os.posix_spawn(executable, argv, dict(os.environ), setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log, 1), (os.POSIX_SPAWN_DUP2, log, 2),
                (os.POSIX_SPAWN_DUP2, to_child_r, 3), (os.POSIX_SPAWN_DUP2, from_child_w, 4)]))
        finally:
            for fd in (log, to_child_r, from_child_w):
                os.close(fd)
        self._w, self._r = to_child_w, from_child_r
        self._cond = threading.Condition()
        self._results: dict[int, dict] = {}
        self._closed = False
        self._next_id = 0
        self.errors: list[str] = []  # page exceptions and console errors, for failure messages
        threading.Thread(target=self._read_loop, daemon=True).start()
        self.session = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"}, timeout=30)["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.page("Page.enable")
            self.page("Runtime.enable")
            self.page("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        except Exception:
            self.close()
            raise

    def _read_loop(self):
        buf = bytearray()
        while True:
            try:
                chunk = os.read(self._r, 1 << 20)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while True:
                end = buf.find(b"\0")
                if end < 0:
                    break
                msg = json.loads(bytes(buf[:end]))
                del buf[:end + 1]
                with self._cond:
                    if "id" in msg:
                        self._results[msg["id"]] = msg
                        self._cond.notify_all()
                    else:
                        self._event(msg)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _event(self, msg):
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            self.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        with self._cond:
            self._next_id += 1
            msg_id = self._next_id
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._w, data):]
        except OSError as e:
            raise BrowserError(f"chromium is gone ({e}); log:\n{_tail(self.log)}") from None
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._results:
                left = deadline - time.monotonic()
                if self._closed:
                    raise BrowserError(f"chromium closed the DevTools pipe during {method}; log:\n{_tail(self.log)}")
                if left <= 0:
                    raise BrowserError(f"no answer to {method} within {timeout:.0f}s")
                self._cond.wait(left)
            reply = self._results.pop(msg_id)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def page(self, method: str, params: dict | None = None, timeout: float = 30):
        return self.send(method, params, session=self.session, timeout=timeout)

    def navigate(self, url: str):
        result = self.page("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url}: {result['errorText']}")

    def evaluate(self, expression: str, timeout: float = 30):
        result = self.page("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in result:
            d = result["exceptionDetails"]
            raise BrowserError("page script failed: " + (d.get("exception", {}).get("description") or d.get("text")))
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str, poll: float = 0.25):
        """Evaluate `expression` until it returns something truthy; return that value."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.evaluate(expression)
            except BrowserError as e:
                if self._closed:
                    raise
                last = str(e)
            else:
                if last:
                    return last
            if time.monotonic() > deadline:
                recent = "\n".join(self.errors[-10:]) or "(none)"
                raise BrowserError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}\n"
                                   f"page errors:\n{recent}")
            time.sleep(poll)

    def screenshot(self, path: Path, scroller: str | None = None, max_height: int = 12000) -> Path:
        """PNG of the page. With `scroller` (a CSS selector of an element that scrolls internally, like JupyterLab's
        notebook panel), the viewport is first made tall enough to show all of its content."""
        height = self.height
        for _ in range(4 if scroller else 0):  # content can grow after a resize (relayout): measure until stable
            need = self.evaluate(f"""(() => {{ const el = document.querySelector({json.dumps(scroller)});
                return el ? Math.ceil(el.getBoundingClientRect().top + el.scrollHeight + 40) : 0; }})()""")
            need = min(need or 0, max_height)
            if need <= height:
                break
            height = need
            self.page("Emulation.setDeviceMetricsOverride", {"width": self.width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False})
            time.sleep(0.5)  # relayout (plotly charts are responsive)
        data = self.page("Page.captureScreenshot", {"format": "png"}, timeout=60)["data"]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self):
        if self.proc.poll() is None and not self._closed:
            try:
                self.send("Browser.close", timeout=5)
            except BrowserError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        kill_tree(self.proc, grace=3)
        for fd in (self._w, self._r):
            try:
                os.close(fd)
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------------------------
# JupyterLab

class JupyterLab:
    """`jupyter lab` on 127.0.0.1:<free port> with a random token; root dir, settings and workspaces are
    throwaway folders under `workdir`. Notebook windowing is off so every cell's output is in the DOM, and the
    trust database is in memory, so every notebook opens untrusted (as a notebook fresh from disk does)."""

    def __init__(self, root_dir: Path, workdir: Path, startup_timeout: float = 45):
        self.root_dir, self.workdir = Path(root_dir), Path(workdir)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.workdir / "jupyterlab.log"
        settings = self.workdir / "lab-settings"
        for name, values in {
            "@jupyterlab/notebook-extension/tracker.jupyterlab-settings":
                {"windowingMode": "none", "scrollPastEnd": False},
            "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
                {"fetchNews": "false", "checkForUpdates": False},
        }.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(values))
        env = dict(os.environ,
                   JUPYTER_CONFIG_DIR=str(self.workdir / "jupyter-config"),
                   JUPYTER_RUNTIME_DIR=str(self.workdir / "jupyter-runtime"),
                   PYDEVD_DISABLE_FILE_VALIDATION="1")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root_dir}",
               "--ServerApp.terminals_enabled=False", "--ServerApp.allow_root=True",
               "--LabApp.extension_manager=readonly", "--NotebookNotary.db_file=:memory:",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={self.workdir / 'lab-workspaces'}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, cwd=self.root_dir, start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except Exception:
            self.stop()
            raise

    def _request(self, path: str, method: str = "GET", timeout: float = 5):
        req = urllib.request.Request(self.url + path, method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()

    def _wait_ready(self, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                if self._request("/api/status", timeout=2)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f}s:\n{_tail(self.log)}")
            time.sleep(0.25)

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{urllib.request.pathname2url(name)}?reset&token={self.token}"

    def stop(self):
        if self.proc.poll() is None:
            try:  # shuts the kernels down too
                self._request("/api/shutdown", method="POST", timeout=5)
                self.proc.wait(8)
            except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
                pass
        kill_tree(self.proc, grace=3)


# ----------------------------------------------------------------------------------------------------------------
# What rendered

# Plotly graph divs and token spans inside output areas (SCOPE: JupyterLab's `.jp-OutputArea-child`, the offline
# page's `.output`). Scoping matters: jupyterlab-plotly briefly draws a second, off-output copy of each chart to
# snapshot it as PNG.
_REPORT_JS = r'''((SCOPE) => {
  const transparent = c => !c || c === 'transparent' || /^rgba\(.*,\s*0\)$/.test(c);
  const plots = [...document.querySelectorAll(SCOPE + ' .js-plotly-plot')].map(p => {
    const svg = p.querySelector('.main-svg');
    const lines = [...p.querySelectorAll('.main-svg .trace path.js-line')]
                    .filter(e => (e.getAttribute('d') || '').length > 10);
    const data = (p._fullData || []).map(t => ({type: t.type, y: t.y ? Array.from(t.y) : null}));
    const title = p.layout && p.layout.title ? (p.layout.title.text ?? p.layout.title) : null;
    const box = p.getBoundingClientRect();
    return {svg: !!svg, traces: p.querySelectorAll('.main-svg .trace').length, lines: lines.length,
            points: p.querySelectorAll('.main-svg .trace .point').length, data, title,
            width: Math.round(box.width), height: Math.round(box.height)};
  });
  const spans = kind => [...document.querySelectorAll(SCOPE + ' .ftlab-tok.ftlab-' + kind)].map(s => ({
      text: s.textContent, style: s.getAttribute('style'), background: getComputedStyle(s).backgroundColor,
      coloured: !transparent(getComputedStyle(s).backgroundColor)}));
  const probes = {};
  for (const el of document.querySelectorAll('.ftlab-probe')) {
    const name = [...el.classList].find(c => c.startsWith('probe-')).slice(6);
    probes[name] = {style: el.getAttribute('style'), background: getComputedStyle(el).backgroundColor,
                    title: el.getAttribute('title'), data_token_id: el.getAttribute('data-token-id'),
                    tag: el.tagName.toLowerCase()};
  }
  return {plots, trained: spans('trained'), masked: spans('masked'), special: spans('special'), probes,
          style_tags_in_outputs: document.querySelectorAll('.jp-OutputArea style, .output style').length,
          summaries: document.querySelectorAll('.ftlab-probe summary, details > summary').length,
          document_title: document.title,
          fallback_divs: document.querySelectorAll(SCOPE + ' .ftlab-chart-fallback').length};
})'''  # called with the scope: _REPORT_JS + '(".output")'


def _ready_js(n_plots: int, n_trained: int, scope: str) -> str:
    # Every expected plot has drawn a trace and the trained spans are present.
    return f'''((SCOPE) => {{
      const plots = [...document.querySelectorAll(SCOPE + ' .js-plotly-plot')];
      const drawn = plots.filter(p => [...p.querySelectorAll('.main-svg .trace path')]
                                        .some(e => (e.getAttribute('d') || '').length > 10));
      const spans = document.querySelectorAll(SCOPE + ' .ftlab-tok.ftlab-trained').length;
      return drawn.length >= {n_plots} && spans >= {n_trained} ? {{plots: drawn.length, spans}} : null;
    }})({json.dumps(scope)})'''


JUPYTERLAB_SCROLLER = ".jp-NotebookPanel .jp-WindowedPanel-outer"  # the element that scrolls the notebook
JUPYTERLAB_SCOPE = ".jp-OutputArea-child"  # holds one cell output (plotly draws into the output node itself)


def check_page(browser: Chromium, url: str, screenshot: Path, n_plots: int = 1, n_trained: int = 1,
               timeout: float = 45, scroller: str = "html", scope: str = ".output") -> dict:
    """Open `url`, wait until `n_plots` plotly charts are drawn and `n_trained` trained token spans exist inside
    the outputs (elements matching `scope`), screenshot the whole content of `scroller` (also when the wait timed
    out) and return the report (_REPORT_JS)."""
    t0 = time.monotonic()
    browser.errors.clear()
    browser.page("Emulation.setDeviceMetricsOverride", {"width": browser.width, "height": browser.height,
                                                        "deviceScaleFactor": 1, "mobile": False})
    browser.navigate(url)
    try:
        browser.wait_for(_ready_js(n_plots, n_trained, scope), timeout,
                         f"{n_plots} plotly charts and {n_trained} trained token spans to render")
    finally:
        browser.screenshot(screenshot, scroller=scroller)
    report = browser.evaluate(_REPORT_JS + f"({json.dumps(scope)})")
    report.update(load_s=round(time.monotonic() - t0, 2), page_errors=list(browser.errors),
                  screenshot=str(screenshot))
    return report


def serve_notebook(executed_nb: Path, workdir: Path) -> tuple[JupyterLab, str]:
    """JupyterLab serving a copy of `executed_nb` from a fresh root dir; returns the server and the notebook's URL.
    The copy is untrusted, as a notebook fresh from disk is."""
    root = Path(workdir) / "root"
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(executed_nb, root / Path(executed_nb).name)
    lab = JupyterLab(root, Path(workdir))
    return lab, lab.notebook_url(Path(executed_nb).name)


def inspect_in_jupyterlab(executed_nb: Path, workdir: Path, screenshot: Path, chromium: str,
                          n_plots: int = 1, n_trained: int = 1, timeout: float = 45) -> dict:
    """Serve `executed_nb` with JupyterLab, open it in headless Chromium and report what rendered; stops both."""
    lab, url = serve_notebook(executed_nb, workdir)
    try:
        browser = Chromium(chromium, Path(workdir))
        try:
            return check_page(browser, url, screenshot, n_plots, n_trained, timeout, scroller=JUPYTERLAB_SCROLLER,
                              scope=JUPYTERLAB_SCOPE)
        finally:
            browser.close()
    finally:
        lab.stop()


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Open an executed notebook in JupyterLab and report what rendered.")
    ap.add_argument("notebook")
    ap.add_argument("--screenshot", default=str(ARTIFACTS / "jupyterlab.png"))
    ap.add_argument("--plots", type=int, default=1)
    ap.add_argument("--trained", type=int, default=0)
    args = ap.parse_args()
    exe = find_chromium()
    if not exe:
        sys.exit("no chromium: run scripts/ensure_browser.sh")
    with tempfile.TemporaryDirectory(prefix="ftlab-browser-") as tmp:
        rep = inspect_in_jupyterlab(Path(args.notebook), Path(tmp), Path(args.screenshot), exe,
                                    n_plots=args.plots, n_trained=args.trained)
    print(json.dumps(rep, indent=1))
