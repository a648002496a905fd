"""The interactive API documentation works offline: ``/docs`` and ``/redoc`` load
Swagger UI (5.x, which renders OpenAPI 3.1) and ReDoc from the server itself, never from
a CDN (a broker on a cluster without internet access showed blank pages before)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tangram.config import default_config
from tangram.server import LiveServer, create_app


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with LiveServer(create_app(default_config())) as u:
        yield u


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_every_asset_from_the_server(url: str, page: str) -> None:
    html = httpx.get(url + page).text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert assets, html
    for asset in assets:
        # Every asset is on the server: no scheme, no host.
        assert asset.startswith("/"), f"{page} loads {asset} from elsewhere"
        res = httpx.get(url + asset)
        assert res.status_code == 200 and len(res.content) > 1000, asset
    assert "/openapi.json" in html


def test_swagger_ui_renders_openapi_3_1(url: str) -> None:
    bundle = httpx.get(url + "/docs-assets/swagger-ui-bundle.js").text
    # Swagger UI renders OpenAPI 3.1 from 5.0 on; FastAPI's document is 3.1.
    assert httpx.get(url + "/openapi.json").json()["openapi"].startswith("3.1")
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.(\d+)\.(\d+)"', bundle)
    assert version is not None and int(version.group(1)) >= 5, version
