"""Authentication to a FHIR server, as ``httpx.Auth`` flows on the connector's one pooled client.

- no auth (``None``), for loopback development servers;
- ``StaticBearerAuth``: a bearer token from a ``SecretStr`` or a token file (re-read per request,
  so a rotated file is picked up);
- ``SmartBackendAuth``: SMART App Launch "Backend Services" (HL7 SMART v2, section 8): OAuth2
  client credentials with a signed JWT client assertion (RFC 7523), ``RS384`` or ``ES384``,
  ``kid`` header, ``iss`` = ``sub`` = client_id, ``aud`` = token URL, unique ``jti``, ``exp`` at
  most 5 minutes ahead. The token endpoint comes from ``{base}/.well-known/smart-configuration``
  unless configured. Tokens are cached until shortly before expiry; a 401 refreshes once. Scopes
  (``ehr.smart_scopes``) are SMART 2 ``system/Type.cruds`` scopes; a token endpoint refusing
  them (``invalid_scope``) is named in the error with what to check.

Token requests are yielded from the auth flow, so they travel on the same pooled client. Keys come
from files named in settings; nothing here logs a token or an assertion.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import SecretStr

from medvlm.errors import ConfigurationError, EhrUnauthorizedError, EhrUnavailableError
from medvlm.settings import EhrSettings

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME_S = 300  # SMART Backend Services: exp no more than five minutes ahead
REFRESH_MARGIN_S = 30.0  # renew a cached token this long before it expires
SCOPES_HINT = "SMART 2 syntax (system/Type.rs); a SMART 1 server needs .read/.write"

__all__ = ["SmartBackendAuth", "StaticBearerAuth", "build_auth"]


class StaticBearerAuth(httpx.Auth):
    """``Authorization: Bearer …`` from a secret value or a file (one of them)."""

    def __init__(self, token: SecretStr | None = None, token_file: Path | None = None) -> None:
        if (token is None) == (token_file is None):
            raise ConfigurationError("bearer auth needs exactly one of a token or a token file")
        self._token = token
        self._token_file = token_file

    def __repr__(self) -> str:
        return f"StaticBearerAuth(token_file={self._token_file!s})"

    def _value(self) -> str:
        if self._token is not None:
            return self._token.get_secret_value()
        assert self._token_file is not None
        try:
            value = self._token_file.read_text().strip()
        except OSError as exc:
            raise ConfigurationError(f"bearer token file {self._token_file} unreadable") from exc
        if not value:
            raise ConfigurationError(f"bearer token file {self._token_file} is empty")
        return value

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._value()}"
        yield request


class SmartBackendAuth(httpx.Auth):
    """SMART Backend Services client-credentials flow with a cached access token."""

    requires_response_body = True  # the flow reads the discovery and token responses

    def __init__(
        self,
        *,
        fhir_base_url: str,
        client_id: str,
        private_key_file: Path,
        key_id: str,
        algorithm: str = "RS384",
        scopes: str = "",
        token_url: str | None = None,
    ) -> None:
        if algorithm not in ("RS384", "ES384"):
            raise ConfigurationError(f"SMART algorithm {algorithm} not allowed (RS384 or ES384)")
        try:
            key = load_pem_private_key(private_key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"SMART private key {private_key_file} is not a readable unencrypted PEM key"
            ) from exc
        wanted = rsa.RSAPrivateKey if algorithm == "RS384" else ec.EllipticCurvePrivateKey
        if not isinstance(key, wanted):
            raise ConfigurationError(
                f"SMART private key {private_key_file} does not fit {algorithm}"
            )
        self._key = key
        self._base = fhir_base_url.rstrip("/")
        self._client_id = client_id
        self._kid = key_id
        self._alg = algorithm
        self._scopes = scopes
        self._token_url = token_url
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return f"SmartBackendAuth(client_id={self._client_id!r}, kid={self._kid!r})"

    def client_assertion(self, audience: str) -> str:
        """A fresh signed JWT (RFC 7523 section 2.2) for the token request."""
        now = int(time.time())
        claims = {
            "iss": self._client_id,
            "sub": self._client_id,
            "aud": audience,
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
        }
        return jwt.encode(
            claims, self._key, algorithm=self._alg, headers={"kid": self._kid, "typ": "JWT"}
        )

    def _cached(self) -> str | None:
        with self._lock:
            if self._token is not None and time.monotonic() < self._expires_at:
                return self._token
            return None

    def _invalidate(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch_token(self) -> Generator[httpx.Request, httpx.Response, str]:
        if self._token_url is None:
            response = yield httpx.Request(
                "GET",
                f"{self._base}/.well-known/smart-configuration",
                headers={"Accept": "application/json"},
            )
            endpoint = _json_field(response, "token_endpoint", "SMART configuration")
            self._token_url = endpoint
        token_url = self._token_url
        response = yield httpx.Request(
            "POST",
            token_url,
            data={
                "grant_type": "client_credentials",
                "scope": self._scopes,
                "client_assertion_type": CLIENT_ASSERTION_TYPE,
                "client_assertion": self.client_assertion(token_url),
            },
            headers={"Accept": "application/json"},
        )
        token = _json_field(response, "access_token", "SMART token endpoint")
        body = response.json()
        expires_in = body.get("expires_in", 300)
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else 300.0
        with self._lock:
            self._token = token
            self._expires_at = time.monotonic() + max(0.0, lifetime - REFRESH_MARGIN_S)
        return token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._cached()
        if token is None:
            token = yield from self._fetch_token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            # Revoked or expired early: renew once; a second 401 is the server's answer.
            self._invalidate(token)
            token = yield from self._fetch_token()
            request.headers["Authorization"] = f"Bearer {token}"
            yield request


def _json_field(response: httpx.Response, field: str, what: str) -> str:
    if response.status_code != 200:
        error = ""
        try:
            body: Any = response.json()
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                error = f" ({body['error'][:64]})"
                if body["error"] == "invalid_scope":
                    error += f"; check ehr.smart_scopes: {SCOPES_HINT}"
        except ValueError:
            pass
        if response.status_code == 429 or response.status_code >= 500:
            raise EhrUnavailableError(f"{what} answered HTTP {response.status_code}")
        raise EhrUnauthorizedError(f"{what} answered HTTP {response.status_code}{error}")
    try:
        value = response.json().get(field)
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, str) or not value:
        raise EhrUnauthorizedError(f"{what} answer has no {field}")
    return value


def build_auth(settings: EhrSettings) -> httpx.Auth | None:
    """The auth flow named by ``settings.auth`` (``None`` for ``none``)."""
    if settings.auth == "none":
        return None
    if settings.auth == "bearer":
        return StaticBearerAuth(settings.token, None if settings.token else settings.token_file)
    if (
        settings.base_url is None
        or settings.smart_client_id is None
        or settings.smart_private_key_file is None
        or settings.smart_key_id is None
    ):
        raise ConfigurationError("SMART auth needs base_url, client id, key file and key id")
    return SmartBackendAuth(
        fhir_base_url=settings.base_url,
        client_id=settings.smart_client_id,
        private_key_file=settings.smart_private_key_file,
        key_id=settings.smart_key_id,
        algorithm=settings.smart_algorithm,
        scopes=settings.smart_scopes,
        token_url=settings.smart_token_url,
    )
