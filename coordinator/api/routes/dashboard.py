"""``GET /``: the live dashboard (static files of ``coordinator/dashboard``, no external
resource; the app serves the script and style sheet under ``/static``)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

#: Where the dashboard's static files live.
DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "dashboard"

router = APIRouter()


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")
