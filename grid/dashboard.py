"""``python -m grid dashboard``: a live web page of the cluster, from the standard library's HTTP server.

::

    GET /               the page: one self-contained HTML file (no CDN, nothing from the internet);
                        it reads the token from its URL's fragment (#token=...), keeps it in a
                        cookie, and asks the API every second
    GET /api/status     Cluster.status, the partition table's owners and the member order (JSON)
    GET /api/logs       the members' recent log lines, merged by time (JSON)
    an API request without the token (``Authorization: Bearer <token>`` or the cookie) gets 401

The token is derived from the cluster secret (an HMAC of it), so whoever has the secret can open
the page and nobody else can read it; without a secret it is random, made when the dashboard starts.
It binds loopback unless told otherwise, and never another interface without a secret: Dask's
dashboard bound every interface (CVE-2021-42343), and Ray's unauthenticated one let anyone run jobs
(CVE-2023-48022).
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import logging
import secrets as secrets_module
import threading
import time
from urllib.parse import parse_qs, urlparse

from .errors import SecurityError
from .net.address import is_loopback
from .net.security import derive_key

log = logging.getLogger("grid.dashboard")

COOKIE = "grid_dashboard"


def dashboard_token(secret: str | None) -> str:
    """The token the dashboard asks for: derived from ``secret``, or random without one."""
    if secret is None:
        return secrets_module.token_hex(16)
    return hmac.new(derive_key(secret), b"grid-dashboard", hashlib.sha256).hexdigest()[:32]


class Dashboard:
    """The dashboard of ``cluster`` (a Cluster handle) on ``host``:``port`` (0: any free one)."""

    def __init__(self, cluster, *, host: str = "127.0.0.1", port: int = 0, secret: str | None = None):
        if not is_loopback(host) and secret is None:
            raise SecurityError(f"the dashboard binds {host} only with a cluster secret (its token comes from it); "
                                "set `secret` or GRID_SECRET, or leave it on loopback")
        self.cluster = cluster
        self.token = dashboard_token(secret)
        self._history: dict = {}
        dashboard = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                log.debug("dashboard: " + format, *args)

            def do_GET(self):  # noqa: N802 - the base class's name
                dashboard.handle(self)

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="grid-dashboard", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """The page's address with its token in the fragment (the fragment never reaches a server)."""
        return f"http://{self.address[0]}:{self.address[1]}/#token={self.token}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- requests -----------------------------------------------------------------------------------------

    def handle(self, request) -> None:
        path = urlparse(request.path)
        if path.path in ("/", "/index.html"):
            self._send(request, 200, PAGE.encode(), "text/html; charset=utf-8")
            return
        if not path.path.startswith("/api/"):
            self._send(request, 404, b'{"error": "not found"}', "application/json")
            return
        if not self._authorized(request):
            self._send(request, 401, b'{"error": "the dashboard token is missing or wrong: open the URL '
                                     b'that python -m grid dashboard printed"}', "application/json")
            return
        try:
            if path.path == "/api/status":
                body = self.status()
            elif path.path == "/api/logs":
                lines = int(parse_qs(path.query).get("lines", ["40"])[0])
                body = self.logs(lines)
            else:
                self._send(request, 404, b'{"error": "not found"}', "application/json")
                return
        except Exception as exc:  # noqa: BLE001 - the page shows it
            body = {"error": f"{type(exc).__name__}: {exc}"}
        self._send(request, 200, json.dumps(body, default=str).encode(), "application/json")

    def _authorized(self, request) -> bool:
        given = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            given = header[len("Bearer "):].strip()
        else:
            for part in request.headers.get("Cookie", "").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    given = value
        return hmac.compare_digest(given.encode(), self.token.encode())

    @staticmethod
    def _send(request, code: int, body: bytes, kind: str) -> None:
        request.send_response(code)
        request.send_header("Content-Type", kind)
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.end_headers()
        request.wfile.write(body)

    def status(self) -> dict:
        status = self.cluster.status(timeout=1.0)
        members = self.cluster.members()
        table = self.cluster.partitions()
        now = time.time()
        for uuid, member in status["members"].items():  # tasks done, over the last minute, for the sparklines
            if isinstance(member, dict):
                points = self._history.setdefault(uuid, [])
                points.append((now, member["tasks"]["done"], member["metrics"]["task_seconds"]["p50"]))
                del points[:-60]
        return {**status, "order": [m.uuid for m in members],
                "addresses": {m.uuid: f"{m.address[0]}:{m.address[1]}" for m in members},
                "owners": [row[0] if row else None for row in table.replicas], "table_version": table.version,
                "history": {uuid: points for uuid, points in self._history.items() if uuid in status["members"]}}

    def logs(self, lines: int) -> list:
        names = {m.uuid: f"{m.address[0]}:{m.address[1]}" for m in self.cluster.members()}
        found = []
        for uuid, answer in self.cluster.logs(lines=lines, level=logging.INFO).items():
            if isinstance(answer, list):
                found += [(when, names.get(uuid, uuid[:8]), logging.getLevelName(level), logger, text)
                          for _, when, level, logger, text in answer]
        return sorted(found)[-lines:]


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>grid dashboard</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
table { border-collapse: collapse; } td, th { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: left; white-space: nowrap; }
#cluster { color: #555; } .error { color: #b00; }
#partitions { display: grid; grid-template-columns: repeat(34, 14px); gap: 2px; }
#partitions div { width: 14px; height: 14px; border-radius: 2px; }
#logs { font: 12px ui-monospace, monospace; background: #f6f6f6; padding: .6em; max-height: 16em; overflow: auto; white-space: pre; }
canvas { vertical-align: middle; }
</style></head>
<body>
<h1>grid</h1><div id="cluster">connecting...</div>
<h2>Members</h2>
<table><thead><tr><th></th><th>address</th><th>role</th><th>up</th><th>tasks queued / running / done</th>
<th>tasks/s</th><th>task p50 / p99</th><th>partitions owned / backed up</th><th>data ops</th><th>in / out KB/s</th>
<th>load</th><th>patches</th></tr></thead>
<tbody id="members"></tbody></table>
<h2>Partition table <span id="table-version"></span></h2><div id="partitions"></div>
<h2>Structures</h2><table><tbody id="structures"></tbody></table>
<h2>Recent logs</h2><div id="logs"></div>
<script>
"use strict";
const colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];
let token = new URLSearchParams(location.hash.slice(1)).get("token");
if (token) { document.cookie = "grid_dashboard=" + token + "; SameSite=Strict; path=/"; history.replaceState(null, "", "/"); }
else { token = (document.cookie.split("; ").find(c => c.startsWith("grid_dashboard=")) || "=").split("=")[1]; }
function text(value) { return document.createTextNode(String(value)); }
function cell(row, value) { const td = document.createElement("td"); td.appendChild(text(value)); row.appendChild(td); return td; }
async function ask(path) {
  const answer = await fetch(path, {headers: {"Authorization": "Bearer " + token}});
  if (answer.status === 401) { throw new Error("the token is missing or wrong: open the URL the dashboard printed"); }
  return answer.json();
}
function sparkline(values, color) {
  const canvas = document.createElement("canvas"); canvas.width = 90; canvas.height = 18;
  const context = canvas.getContext("2d"), top = Math.max(1e-9, ...values);
  context.strokeStyle = color; context.beginPath();
  values.forEach((value, i) => { const x = i * 90 / Math.max(1, values.length - 1), y = 17 - value / top * 16; i ? context.lineTo(x, y) : context.moveTo(x, y); });
  context.stroke();
  return canvas;
}
function rates(points) {
  const found = [];
  for (let i = 1; i < points.length; i++) { found.push((points[i][1] - points[i-1][1]) / Math.max(points[i][0] - points[i-1][0], 1e-3)); }
  return found;
}
async function refresh() {
  try {
    const status = await ask("/api/status");
    if (status.error) { throw new Error(status.error); }
    const index = {}; status.order.forEach((uuid, i) => index[uuid] = i);
    document.getElementById("cluster").textContent = status.order.length + " members, master " +
      (status.addresses[status.master] || "?") + ", member list version " + status.members_version +
      ", is_safe " + status.is_safe;
    const rows = document.getElementById("members"); rows.replaceChildren();
    const structures = {};
    for (const uuid of status.order) {
      const member = status.members[uuid], row = document.createElement("tr");
      row.className = "member"; row.dataset.uuid = uuid;
      const swatch = cell(row, "\\u25a0"); swatch.style.color = colors[index[uuid] % colors.length];
      cell(row, status.addresses[uuid]);
      if (typeof member === "string") { cell(row, member).className = "error"; rows.appendChild(row); continue; }
      cell(row, member.role); cell(row, Math.round(member.uptime) + " s");
      cell(row, member.tasks.queued + " / " + member.tasks.running + " / " + member.tasks.done);
      const history = status.history[uuid] || [], perSecond = rates(history);
      const rateCell = cell(row, " " + (perSecond.length ? perSecond[perSecond.length - 1] : 0).toFixed(1));
      rateCell.prepend(sparkline(perSecond, "#4e79a7"));
      const metrics = member.metrics, ms = v => v === null ? "-" : v < 0.001 ? (v * 1e6).toFixed(0) + " \u00b5s" : (v * 1000).toFixed(1) + " ms";
      const kb = v => v === null ? "-" : (v / 1024).toFixed(1);
      const latency = cell(row, " " + ms(metrics.task_seconds.p50) + " / " + ms(metrics.task_seconds.p99));
      latency.prepend(sparkline(history.map(point => point[2] || 0), "#e15759"));
      cell(row, member.partitions.owned + " / " + member.partitions.backups);
      cell(row, Object.values(metrics.data_ops).reduce((a, b) => a + b, 0));
      cell(row, kb(metrics.bytes_in_per_s) + " / " + kb(metrics.bytes_out_per_s));
      cell(row, member.load[0].toFixed(2)); cell(row, member.patches);
      rows.appendChild(row);
      for (const [name, info] of Object.entries(member.structures).filter(([name]) => !name.startsWith("__grid."))) {
        structures[name] = structures[name] || {kind: info.kind, size: 0}; structures[name].size += info.size;
      }
    }
    const grid = document.getElementById("partitions"); grid.replaceChildren();
    status.owners.forEach((owner, partition) => {
      const square = document.createElement("div");
      square.style.background = owner in index ? colors[index[owner] % colors.length] : "#ddd";
      square.title = "partition " + partition + ": " + (status.addresses[owner] || "no owner");
      grid.appendChild(square);
    });
    document.getElementById("table-version").textContent = "(version " + status.table_version + ")";
    const list = document.getElementById("structures"); list.replaceChildren();
    for (const [name, info] of Object.entries(structures).sort()) {
      const row = document.createElement("tr"); cell(row, name); cell(row, info.kind); cell(row, info.size); list.appendChild(row);
    }
    const logs = await ask("/api/logs?lines=40");
    document.getElementById("logs").textContent = logs.map(([when, address, level, logger, line]) =>
      new Date(when * 1000).toLocaleTimeString() + " " + address + " " + level + " " + logger + ": " + line).join("\\n");
  } catch (error) {
    const cluster = document.getElementById("cluster"); cluster.textContent = String(error.message || error); cluster.className = "error";
  }
}
refresh(); setInterval(refresh, 1000);
</script>
</body></html>
"""
