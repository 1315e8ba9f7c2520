"""Registry authentication: push and pull against a real registry (tests/registry_fixture.py) that asks for
basic credentials, or that trusts a token server this test runs (the Docker token flow, RS256 JWTs)."""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from pathlib import Path

import pytest

from ember.errors import EmberError
from ember.store import resolve_model
from ember.store.registry import TransferOptions, parse_challenge, pull, push
from registry_fixture import start_registry
from registry_helpers import ember, homes, listing, make_model, partial_files  # noqa: F401  (homes: fixture)


# ---- authentication ------------------------------------------------------------------------------------------


def _bcrypt(password: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt
        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
    except (ImportError, AttributeError, OSError):
        hashed = None
    if not hashed or not hashed.startswith("$2"):
        pytest.skip("no bcrypt implementation to write an htpasswd file")
    return hashed


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("basic-registry")
    (d / "htpasswd").write_text(f"alice:{_bcrypt('s3cret')}\n")
    reg = start_registry(d, env={"REGISTRY_AUTH": "htpasswd", "REGISTRY_AUTH_HTPASSWD_REALM": "ember-test",
                                 "REGISTRY_AUTH_HTPASSWD_PATH": str(d / "htpasswd")})
    yield reg
    reg.stop()


def test_basic_auth(basic_registry, homes, tmp_path):
    a = homes.use("a")
    name = f"{basic_registry.host}/alice/private:latest"
    make_model(name, tmp_path)
    r = ember("push", name, "--insecure", home=a)
    assert r.returncode == 1
    assert "requires authentication: set EMBER_REGISTRY_USERNAME and EMBER_REGISTRY_PASSWORD" in r.stderr
    r = ember("push", name, "--insecure", home=a,
              env={"EMBER_REGISTRY_USERNAME": "alice", "EMBER_REGISTRY_PASSWORD": "wrong"})
    assert r.returncode == 1 and "authentication failed" in r.stderr, r.stderr
    r = ember("push", name, "--insecure", home=a,
              env={"EMBER_REGISTRY_USERNAME": "alice", "EMBER_REGISTRY_PASSWORD": "s3cret"})
    assert r.returncode == 0, r.stderr

    b = homes.use("b")
    with pytest.raises(EmberError, match="requires authentication"):
        pull(name, insecure=True)
    assert listing(b) == {}
    pull(name, insecure=True, username="alice", password="s3cret")
    assert resolve_model(name).system == "You are tiny."


def test_parse_challenge():
    assert parse_challenge('Bearer realm="https://auth.example/token",service="reg",'
                           'scope="repository:a/b:pull,push"') == (
        "bearer", {"realm": "https://auth.example/token", "service": "reg", "scope": "repository:a/b:pull,push"})
    assert parse_challenge('Basic realm="x y"') == ("basic", {"realm": "x y"})
    assert parse_challenge("") == ("", {})


# ---- token auth: the registry trusts a token server that this test runs --------------------------------------


def _b64url(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The Docker token flow's other half: checks basic credentials, issues RS256 JWTs (certificate chain in
    the x5c header) granting what was asked for, and records each request."""

    def __init__(self, directory: Path, users: dict[str, str]) -> None:
        pytest.importorskip("cryptography")
        import datetime
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ember test token issuer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(hours=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        self.bundle = directory / "token-root.pem"
        self.bundle.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        x5c = __import__("base64").b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.service, self.issuer = "ember-test-registry", "ember-test-issuer"
        self.requests: list[dict] = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                import base64 as b64

                query = parse_qs(urlparse(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = None
                if auth.startswith("Basic "):
                    name, _, pw = b64.b64decode(auth[6:]).decode().partition(":")
                    user = name if users.get(name) == pw else None
                server_self.requests.append({"user": user, "scope": query.get("scope", []),
                                             "service": query.get("service", [""])[0]})
                if user is None:
                    self.send_response(401)
                    self.end_headers()
                    return
                access = []
                for scope in query.get("scope", []):
                    kind, name, actions = scope.split(":")
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
                t = int(time.time())
                claims = {"iss": server_self.issuer, "sub": user, "aud": server_self.service, "exp": t + 300,
                          "nbf": t - 10, "iat": t, "jti": os.urandom(8).hex(), "access": access}
                signing_input = (_b64url(json.dumps({"typ": "JWT", "alg": "RS256", "x5c": [x5c]}).encode())
                                 + "." + _b64url(json.dumps(claims).encode()))
                signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
                body = json.dumps({"token": signing_input + "." + _b64url(signature)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("token-registry")
    tokens = TokenServer(d, {"alice": "s3cret"})
    reg = start_registry(d, env={
        "REGISTRY_AUTH": "token", "REGISTRY_AUTH_TOKEN_REALM": tokens.realm,
        "REGISTRY_AUTH_TOKEN_SERVICE": tokens.service, "REGISTRY_AUTH_TOKEN_ISSUER": tokens.issuer,
        "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": str(tokens.bundle),
    })
    yield reg, tokens
    reg.stop()
    tokens.close()


def test_token_auth(token_registry, homes, tmp_path):
    reg, tokens = token_registry
    homes.use("a")
    name = f"{reg.host}/alice/tokened:latest"
    make_model(name, tmp_path)
    with pytest.raises(EmberError, match="requires authentication: set EMBER_REGISTRY_USERNAME"):
        push(name, insecure=True)
    with pytest.raises(EmberError, match="authentication failed"):
        push(name, insecure=True, username="alice", password="wrong")
    tokens.requests.clear()
    push(name, insecure=True, username="alice", password="s3cret")
    # One token for the whole push (cached), asked for with the registry's service and the push scope.
    assert tokens.requests == [{"user": "alice", "scope": ["repository:alice/tokened:pull,push"],
                                "service": tokens.service}]

    b = homes.use("b")
    homes.mp.setenv("EMBER_REGISTRY_USERNAME", "alice")
    homes.mp.setenv("EMBER_REGISTRY_PASSWORD", "s3cret")
    tokens.requests.clear()
    pull(name, insecure=True, options=TransferOptions(part_size=64 << 10))
    assert [r["scope"] for r in tokens.requests] == [["repository:alice/tokened:pull"]]
    assert resolve_model(name).system == "You are tiny."
    assert partial_files(b) == []
