"""Connecting to CVAT through cvat-sdk, and turning what can go wrong into errors a user can act on.

``connect`` returns a plain ``cvat_sdk.Client`` (use it as a context manager). Credentials come from the arguments or
the environment (``CVAT_URL``, ``CVAT_USERNAME``/``CVAT_PASSWORD``, ``CVAT_ACCESS_TOKEN``, ``CVAT_ORG``). A username
and password log in a session, as the SDK does; an access token is CVAT's API key, sent as
``Authorization: Token <key>`` (CVAT 2.42 accepts it, and the SDK has no credentials type for it: its
``AccessTokenCredentials`` send ``Bearer``, which only newer servers understand).

Secrets never reach a log record or an error message: SDK exceptions print the response headers (session cookies
included), so ``cvat_errors`` builds its own message from the status and the server's ``detail`` only.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit

import urllib3
from cvat_sdk import Client, Config
from cvat_sdk.api_client.exceptions import ApiException

log = logging.getLogger(__name__)
_versions_logged: set[str] = set()


class CvatError(Exception):
    """A problem with the CVAT server or the request that the user can fix; the message says what to do."""


def connect(url: str | None = None, *, username: str | None = None, password: str | None = None,
            access_token: str | None = None, organization: str | None = None, verify_tls: bool = True) -> Client:
    """A logged-in ``cvat_sdk.Client`` for ``url`` (or ``$CVAT_URL``); ``organization`` (or ``$CVAT_ORG``) is the
    organization slug every request runs in (``""``: the personal workspace). Explicit arguments win over the
    environment; an access token wins over a password when both come from the same place."""
    url = url or os.environ.get("CVAT_URL")
    if not url:
        raise CvatError("no CVAT server given: pass a URL such as http://localhost:8080 or set CVAT_URL")
    if urlsplit(url).scheme not in ("http", "https"):
        raise CvatError(f"the CVAT URL {url!r} needs a scheme: http://{url} or https://{url}")
    if access_token is None and username is None:  # nothing explicit: the environment decides
        access_token = os.environ.get("CVAT_ACCESS_TOKEN") or None
        username = None if access_token else os.environ.get("CVAT_USERNAME") or None
    if username is not None and password is None:
        password = os.environ.get("CVAT_PASSWORD")
    if not access_token and not (username and password):
        raise CvatError("no CVAT credentials: pass a username and password or an access token, or set "
                        "CVAT_USERNAME and CVAT_PASSWORD, or CVAT_ACCESS_TOKEN")
    if organization is None:
        organization = os.environ.get("CVAT_ORG") or None

    # The SDK's version check would warn on every client (cvat-sdk 2.80 against a 2.42 server): the version is
    # logged once per server instead.
    client = Client(url.rstrip("/"), config=Config(verify_ssl=verify_tls), check_server_version=False)
    # cvat-sdk retries a refused connection three times with backoff, warning each time, and resets urllib3's
    # log level to WARNING for every client: one retry of the connection, the 5xx retries kept, and the warnings
    # only with -v (our error says once what went wrong).
    client.api_client.configuration.retries = urllib3.util.Retry(
        total=3, connect=1, status_forcelist=(502, 503, 504), backoff_factor=0.5)
    client.api_client.rest_client.pool_manager.connection_pool_kw["retries"] = \
        client.api_client.configuration.retries
    if not log.isEnabledFor(logging.INFO):
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    secrets = [s for s in (password, access_token) if s]
    try:
        with cvat_errors(client, "the CVAT API", secrets=secrets):
            version = str(client.get_server_version())
            if client.api_map.host not in _versions_logged:
                _versions_logged.add(client.api_map.host)
                log.info("CVAT %s at %s", version, client.api_map.host)
            if organization is not None:
                client.organization_slug = organization
            if access_token:
                client.api_client.configuration.api_key["tokenAuth"] = access_token  # prefixed "Token " by the SDK
                client.users.retrieve_current_user()  # a token is only checked when used: check it now
            else:
                client.login((username, password))
    except BaseException:
        client.close()
        raise
    return client


@contextmanager
def cvat_errors(client: Client | str, what: str | None = None, *, secrets: Sequence[str] = ()) -> Iterator[None]:
    """Turn cvat-sdk and urllib3 exceptions raised inside the block into a ``CvatError``; ``what`` names the
    object the block works on (``"task 7"``), for the not-found and forbidden messages. ``secrets`` are masked in
    anything the server sends back."""
    host = client if isinstance(client, str) else client.api_map.host
    try:
        yield
    except ApiException as error:
        message = _api_message(error, host, what)
        for secret in secrets:
            message = message.replace(secret, "***")
        raise CvatError(message) from None  # the SDK error prints response headers: cookies stay out of tracebacks
    except urllib3.exceptions.MaxRetryError as error:
        reason = error.reason
        if isinstance(reason, urllib3.exceptions.SSLError):
            raise CvatError(f"TLS verification failed for CVAT at {host} ({reason}); pass verify_tls=False only "
                            "for a server you trust") from None
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            raise CvatError(f"cannot connect to CVAT at {host}: {_last_line(reason)}; is the server running and "
                            "the URL right?") from None
        raise CvatError(f"CVAT at {host} did not answer{_for(what)}: {_last_line(reason or error)}") from None
    except urllib3.exceptions.HTTPError as error:
        raise CvatError(f"lost the connection to CVAT at {host}{_for(what)}: {_last_line(error)}") from None


def _api_message(error: ApiException, host: str, what: str | None) -> str:
    detail = _detail(error.body)
    if error.status == 404:
        return f"{what or 'the object'} was not found on {host}"
    if error.status == 401:
        return f"CVAT at {host} rejected the credentials: {detail or 'unauthorized'} (401)"
    if error.status == 400 and "log in" in detail:  # the session login endpoint answers 400 to a wrong password
        return f"CVAT at {host} rejected the username or password: {detail}"
    if error.status == 403:
        return f"not allowed to access {what or 'this'} on {host}: {detail or 'forbidden'} (403)"
    return f"CVAT at {host} answered {error.status} {error.reason or ''}{_for(what)}".rstrip() + (
        f": {detail}" if detail else "")


def _detail(body: bytes | str | None) -> str:
    """The human part of a CVAT error body: ``{"detail": ...}``, a list of messages, a field → messages dict or a
    string; HTML error pages are left out."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        data = json.loads(text)
    except ValueError:
        return "" if text.lstrip().startswith("<") else text.strip()[:300]
    if isinstance(data, dict) and "detail" in data:
        data = data["detail"]
    if isinstance(data, dict):  # DRF field errors; "non_field_errors" (a wrong login) needs no field name
        data = [item if key == "non_field_errors" else f"{key}: {item}"
                for key, items in data.items() for item in (items if isinstance(items, list) else [items])]
    if isinstance(data, list):
        data = "; ".join(str(item) for item in data)
    return str(data)[:300]


def _for(what: str | None) -> str:
    return f" for {what}" if what else ""


def _last_line(error: BaseException) -> str:
    """urllib3 reasons repeat the connection object's repr; the part after the last colon is the useful one."""
    text = str(error)
    return text.rsplit(": ", 1)[-1] if ": " in text else text
