"""The web playground's static side (issue #15): `/` and its assets, their content types, that they are public
while the API is not, path traversal, and `--ui false`. The browser tests are in tests/browser (marked browser)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.api import ui
from service.config import Settings, parse_settings
from service.main import create_app

KEY = "sk-ui-test-0123456789"


def client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(enable_gan=False, **settings)))  # type: ignore[arg-type]


def test_index_serves_the_labelled_controls() -> None:
    r = client().get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in r.headers["content-security-policy"]
    html = r.text
    for label in ("Model", "Message", "System prompt", "JSON schema (optional)", "Prompt", "API key"):
        assert re.search(rf"<label for=\"[\w-]+\">{re.escape(label)}</label>", html), label
    for label in ("Digit", "Count", "Temperature", "Top p", "Max tokens", "Seed"):
        assert f"<label>{label} <input" in html, label
    assert 'role="log" aria-label="Conversation"' in html
    for button in ("Send", "Stop", "Generate", "Complete", "Interpolate"):
        assert f">{button}</button>" in html, button
    # no third-party origin anywhere: no CDN, nothing fetched from the network at run time
    assert not re.search(r"(src|href)=\"(https?:)?//", html)


@pytest.mark.parametrize(("name", "content_type"), sorted(ui.ASSETS.items()))
def test_assets_have_their_content_types(name: str, content_type: str) -> None:
    c = client()
    r = c.get(f"/static/{name}")
    assert r.status_code == 200 and r.headers["content-type"] == content_type
    assert r.content == (ui.STATIC_DIR / name).read_bytes()
    h = c.head(f"/static/{name}")
    assert h.status_code == 200 and h.headers["content-type"] == content_type and h.content == b""
    assert int(h.headers["content-length"]) == len(r.content)


def test_model_text_is_never_parsed_as_html() -> None:
    js = (ui.STATIC_DIR / "app.js").read_text()
    assert "innerHTML" not in js and "outerHTML" not in js and "insertAdjacentHTML" not in js
    assert "eval(" not in js and "document.write" not in js


@pytest.mark.parametrize(
    "path",
    [
        "/static/",
        "/static/../config.py",
        "/static/..%2Fconfig.py",
        "/static/ui.py",
        "/static/%2e%2e/api/ui.py",
        "/static/index.html/..",
        "/index.html",
    ],
)
def test_only_the_named_assets_are_served(path: str) -> None:
    r = client().get(path)
    assert r.status_code == 404, (path, r.status_code)
    assert "import" not in r.text


def test_the_page_is_public_and_the_api_is_not() -> None:
    c = client(api_keys=[KEY])
    for path in ui.PUBLIC_PATHS:
        assert c.get(path).status_code == 200, path
        assert c.head(path).status_code == 200, path
    assert c.get("/v1/models").status_code == 401
    assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 401
    assert c.get("/docs").status_code == 401
    assert c.get("/static/nope.js").status_code == 401  # only the named assets are public
    # the user's public paths are left as they were, the UI's are added
    c = client(api_keys=[KEY], public_paths=["/health"])
    assert c.get("/").status_code == 200 and c.get("/metrics").status_code == 401


@pytest.mark.parametrize("argv", [["--ui", "false"], ["--no-ui"]])
def test_ui_can_be_turned_off(argv: list[str]) -> None:
    settings = parse_settings([*argv, "--enable-gan", "false"])
    assert settings.ui is False
    c = TestClient(create_app(settings))
    assert c.get("/").status_code == 404
    assert c.get("/static/app.js").status_code == 404
    assert c.get("/docs").status_code == 200
    assert parse_settings([]).ui is True
    assert client().get("/docs").status_code == 200


def test_ui_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGC_UI", "false")
    assert Settings().ui is False
