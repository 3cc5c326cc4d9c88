"""`/docs` and `/redoc` work with no internet: every script, style and icon they load comes from this server."""

from __future__ import annotations

import re


def test_docs_pages_load_only_local_assets(start_api):
    api = start_api()
    for page in ("/docs", "/redoc"):
        response = api.http.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "/openapi.json" in html
        sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
        assert sources, html
        for source in sources:
            assert not source.startswith(("http:", "https:", "//")), f"{page} loads {source} from elsewhere"
            asset = api.http.get(source)
            assert asset.status_code == 200 and len(asset.content) > 1000, source
    assert "SwaggerUIBundle" in api.http.get("/docs-assets/swagger-ui-bundle.js").text
    assert "/docs-assets" not in str(api.http.get("/openapi.json").json()["paths"])
