"""The playground: a browser page at `/` and `/playground`, served from files inside the package.

The page (services/api/playground/) is plain HTML, CSS and JavaScript modules: no build step, no CDN, so it
works offline on a clean install. It talks to the service only through the public API (`/v1/jobs`, its SSE
stream, `/metrics`, `/readyz`) with the API key the user typed. The one thing the server adds to the page is
the served model's name and sampler defaults (`generation_config.json`, read once with the tokenizer files), so
the knobs start at the values a job without them would get. Serving the page needs no API key: it holds no data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from dgtext.checkpoint_files import TOKENIZER_FILE_PATTERNS, CheckpointError, resolve_model_dir
from services.api.deps import ServicesDep
from services.api.errors import ApiError

logger = logging.getLogger(__name__)
router = APIRouter(include_in_schema=False)

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
# Every asset the page loads, by name: nothing else under the folder (and no path from the URL) is served.
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml"}
CONFIG_PLACEHOLDER = "__DGSERVE_PLAYGROUND_CONFIG__"
# The knobs of a generate job that generation_config.json can default (docs/api.md).
DEFAULT_KNOBS = ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max",
                 "confidence_threshold", "stability_threshold")
# The page is small and changes with the package: revalidate instead of caching stale code after an upgrade.
NO_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


_defaults_by_model: dict[str, dict[str, Any]] = {}


def model_defaults(model: str) -> dict[str, Any]:
    """The sampler defaults of `model` from its generation_config.json; {} when it cannot be read (the page
    then leaves the knobs empty, which also means "the model's default"). Only a successful read is kept, so
    a model whose files appear later (a download that finished) gets its defaults then."""
    if model in _defaults_by_model:
        return _defaults_by_model[model]
    try:
        folder = resolve_model_dir(model, allow_patterns=TOKENIZER_FILE_PATTERNS)
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (CheckpointError, OSError, ValueError) as exc:
        logger.warning("playground: no generation defaults for %s: %s", model, exc)
        return {}
    sampler = config.get("sampler_config") or {}
    merged = {**sampler, **config}  # the released layout keeps entropy_bound inside sampler_config
    defaults = {knob: merged[knob] for knob in DEFAULT_KNOBS if isinstance(merged.get(knob), int | float)}
    _defaults_by_model[model] = defaults
    return defaults


def page_html(model_name: str, defaults: dict[str, Any], auth_enabled: bool) -> str:
    """index.html with the page's configuration inlined as JSON (`<` escaped: it sits inside a script tag)."""
    config = {"model": model_name, "defaults": defaults, "authEnabled": auth_enabled}
    inline = json.dumps(config).replace("<", "\\u003c")
    return (PLAYGROUND_DIR / "index.html").read_text(encoding="utf-8").replace(CONFIG_PLACEHOLDER, inline)


def _page(services: ServicesDep) -> HTMLResponse:
    settings = services.settings
    html = page_html(settings.model_name, model_defaults(settings.model), settings.auth_enabled)
    return HTMLResponse(html, headers=NO_CACHE)


@router.get("/", response_class=HTMLResponse)
def root_page(services: ServicesDep) -> HTMLResponse:
    """The playground is the first thing a new user opens after `make up`."""
    return _page(services)


@router.get("/playground", response_class=HTMLResponse)
def playground_page(services: ServicesDep) -> HTMLResponse:
    return _page(services)


@router.get("/playground/static/{name}")
def playground_asset(name: str) -> Response:
    """One file of the page; only plain names of the folder with a known type (no subpaths, no dotfiles)."""
    path = PLAYGROUND_DIR / name
    media_type = ASSET_TYPES.get(path.suffix)
    if media_type is None or "/" in name or name.startswith(".") or not path.is_file():
        raise ApiError(404, "not_found", f"no playground asset named {name[:80]!r}")
    return Response(path.read_bytes(), media_type=media_type, headers=NO_CACHE)
