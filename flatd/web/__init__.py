"""The optional HTTP endpoint of `flatd watch` (rules file `http:`): /healthz, /metrics and
a read-only status page (/), with the preview pictures of the masters (/preview/<job id>).

metrics: Prometheus figures fed by the event bus; health: the checks behind /healthz;
page: the status page's data and templates; server: the HTTP server itself.
"""

from __future__ import annotations

from flatd.web.server import WebApp, WebError, WebServer

__all__ = ["WebApp", "WebError", "WebServer", "start_for"]


def start_for(service) -> WebServer:
    """Serve the endpoint of a running flatd.service.Service (its http.listen set):
    subscribe the metrics to the events, bind (WebError when it cannot), start serving."""
    from flatd.config import parse_listen
    from flatd.notify.events import notice, subscribe
    from flatd.web.health import service_problems
    from flatd.web.metrics import Metrics

    metrics = Metrics()
    host, port = parse_listen(service.rules.http.listen)
    app = WebApp(lambda: service.rules, lambda: service_problems(service), metrics)
    server = WebServer(host, port, app)
    server.on_stop.append(subscribe(metrics))
    server.start()
    host, port = server.address
    notice("http_listening", f"HTTP endpoint on {server.url} (/healthz, /metrics, status page)"
           + ("; token required" if service.rules.http.token else ""), host=host, port=port)
    return server
