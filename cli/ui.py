"""``kubetune ui``: the web console for the current kubeconfig user, on this machine.

It runs kubetune-server on the loopback with one caller: the kubeconfig's own user (a token, an
exec or OIDC plugin's token, or a client certificate, whatever kubectl would send), and opens the
browser on a one-time launch link. The browser's session cookie stands for that user and nothing
else; any other bearer token is refused. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import hmac
import secrets
import ssl
import tempfile
import webbrowser
from pathlib import Path
from typing import Any

from kubetune.server.errors import unauthorized
from kubetune.server.kube import Endpoint, Kube


class KubeconfigKube(Kube):
    """The API server as the kubeconfig's user, for whoever holds ``session`` (the console's
    cookie): the local console's only caller."""

    def __init__(
        self, endpoint: Endpoint, timeout: float, session: str, headers: dict[str, str]
    ) -> None:
        super().__init__(endpoint, timeout)
        self.session = session
        self.headers = headers

    def credentials(self, token: str) -> dict[str, str]:
        if not hmac.compare_digest(token, self.session):
            raise unauthorized()
        return dict(self.headers)


def kubeconfig_identity(
    kubeconfig: str | None, context: str | None
) -> tuple[Endpoint, dict[str, str]]:
    """Where the API server is and how the kubeconfig's user proves who they are, as the
    kubernetes client reads it (tokens, exec plugins, client certificates)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    verify: ssl.SSLContext | bool = True
    if not configuration.verify_ssl:
        verify = False
    else:
        verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file and configuration.key_file:
            verify.load_cert_chain(configuration.cert_file, configuration.key_file)
    headers: dict[str, str] = {}
    authorization = configuration.api_key.get("authorization") or configuration.api_key.get(
        "BearerToken"
    )
    if authorization:
        prefix = configuration.api_key_prefix.get("authorization")
        headers["Authorization"] = f"{prefix} {authorization}" if prefix else str(authorization)
    return Endpoint(str(configuration.host), verify), headers


def current_namespace(kubeconfig: str | None, context: str | None) -> str:
    from kubernetes import config

    contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    chosen: dict[str, Any] = next((c for c in contexts if c["name"] == context), active) or {}
    return str((chosen.get("context") or {}).get("namespace") or "default")


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from kubetune.local.ports import free_port
    from kubetune.server.app import create_app
    from kubetune.server.settings import ServerSettings

    endpoint, headers = kubeconfig_identity(args.kubeconfig, args.context)
    session = secrets.token_urlsafe(32)
    port = args.port or free_port()
    files = Path(tempfile.mkdtemp(prefix="kubetune-ui-"))
    settings = ServerSettings(
        host="127.0.0.1", port=port, files_dir=files, rate_limit_per_second=0,
        default_namespace=current_namespace(args.kubeconfig, args.context),
        dataset_base_url=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    kube = KubeconfigKube(endpoint, settings.kube_timeout_seconds, session, headers)
    app = create_app(settings, kube=kube)
    code = secrets.token_urlsafe(16)
    app.state.console.launch_codes[code] = session
    url = f"http://127.0.0.1:{port}/ui/launch/{code}"
    print(f"kubetune console for the current kubeconfig user: {url}", flush=True)
    print("(the link works once; Ctrl-C stops the console)", flush=True)
    if not args.no_browser:
        webbrowser.open(url)
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ui", help="open the web console as the current kubeconfig user (a local server)"
    )
    parser.add_argument("--kubeconfig", help="kubeconfig (default: $KUBECONFIG, then ~/.kube)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--port", type=int, default=0, help="local port (default: a free one)")
    parser.add_argument(
        "--no-browser", action="store_true", help="print the launch link, don't open a browser"
    )
    parser.set_defaults(func=_run)
