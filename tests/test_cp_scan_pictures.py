"""A scan's pictures over REST: served from the file the consumer reported, only from under the
jobs directory and only while it holds what was reported; refused to other projects, and every
refusal a clear problem."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from cp_helpers import ClientFactory, ControlPlane
from PIL import Image
from test_cp_sessions_api import RESULT, consumer_token, opened, project_token, start_control_plane
from test_pictures import FRAME_SHAPE, SCAN_SHAPE, random_frames, write_events

from controlplane import pictures

PICTURE = "/api/v1/sessions/{session}/scans/{scan}/pictures/{picture}"


@pytest.fixture
async def cp(aiohttp_client: ClientFactory, tmp_path: Path) -> ControlPlane:
    control_plane = await start_control_plane(aiohttp_client, tmp_path)
    await control_plane.create_project("alpha")
    await control_plane.create_project("beta")
    return control_plane


def scan_file(directory: Path, seed: int = 3) -> Path:
    """A scan file made by the consumer's own writer."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_events(directory, random_frames(seed, SCAN_SHAPE[0] * SCAN_SHAPE[1]))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def reported(cp: ControlPlane, path: Path, sha: str | None = None,
                   scan: int = 1) -> tuple[str, str]:
    """A project token and a session of alpha whose consumer reported ``path`` for ``scan``."""
    token, session = await opened(cp)
    body = {**RESULT, "path": str(path), "sha256": sha or sha256(path)}
    response = await cp.call("POST", f"/api/v1/sessions/{session['id']}/scans/{scan}/result",
                             await consumer_token(cp, token), json=body)
    assert response.status == 200, await response.text()
    return token, session["id"]


def url(session: str, picture: str, scan: int = 1) -> str:
    return PICTURE.format(session=session, scan=scan, picture=picture)


async def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json()
    assert body["type"] == f"urn:dsn:problem:{slug}", body
    return body


@pytest.fixture
def opened_files(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the service hashes or reads events from."""
    seen: list[Path] = []
    digest, load = pictures.file_sha256, pictures.load_pictures

    def spying_digest(path: Path) -> str:
        seen.append(path)
        return digest(path)

    def spying_load(path: Path, *args: Any, **kwargs: Any) -> pictures.Pictures:
        seen.append(path)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(pictures, "file_sha256", spying_digest)
    monkeypatch.setattr(pictures, "load_pictures", spying_load)
    return seen


async def test_both_pictures_of_a_reported_file_are_served_with_an_etag(
        cp: ControlPlane) -> None:
    path = scan_file(cp.settings.jobs_dir / "job-pics" / "output")
    token, session = await reported(cp, path)
    sizes = {}
    for picture in ("bright-field.png", "diffraction.png"):
        response = await cp.call("GET", url(session, picture), token)
        assert response.status == 200, await response.text()
        assert response.content_type == "image/png"
        assert response.headers["ETag"] == f'"{sha256(path)}-{picture}"'
        assert response.headers["Cache-Control"].startswith("private")
        image = Image.open(io.BytesIO(await response.read()))
        assert image.mode == "L"
        sizes[picture] = image.size  # (width, height)
        again = await cp.call("GET", url(session, picture), token,
                              headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304
    assert sizes == {"bright-field.png": SCAN_SHAPE[::-1], "diffraction.png": FRAME_SHAPE[::-1]}
    assert (cp.audit_rows()[-1][2:5]
            == ("scans:read", f"scan/alpha/{session}/1", "allow"))


async def test_the_same_file_is_read_once_while_it_is_unchanged(
        cp: ControlPlane, opened_files: list[Path]) -> None:
    path = scan_file(cp.settings.jobs_dir / "job-once" / "output")
    token, session = await reported(cp, path)
    for picture in ("bright-field.png", "diffraction.png", "bright-field.png"):
        assert (await cp.call("GET", url(session, picture), token)).status == 200
    assert opened_files == [path.resolve(), path.resolve()]  # hashed, then its events read


async def test_another_projects_token_is_refused(cp: ControlPlane,
                                                 opened_files: list[Path]) -> None:
    _, session = await reported(cp, scan_file(cp.settings.jobs_dir / "job-x" / "output"))
    beta = await project_token(cp, "beta")
    response = await cp.call("GET", url(session, "bright-field.png"), beta)
    assert (await problem(response, 403, "forbidden"))["detail"]
    assert cp.audit_rows()[-1][4:6] == ("deny", "cross-project")
    assert opened_files == []


async def test_a_file_outside_the_jobs_directory_is_never_read(
        cp: ControlPlane, tmp_path: Path, opened_files: list[Path]) -> None:
    # A real scan file, reported with its true digest: only where it lies is wrong.
    outside = scan_file(tmp_path / "elsewhere")
    token, session = await reported(cp, outside)
    body = await problem(await cp.call("GET", url(session, "diffraction.png"), token), 404,
                         "no-scan-file")
    assert "not a file under the jobs directory" in body["detail"]
    # Nor through a link inside the jobs directory.
    link = cp.settings.jobs_dir / "job-link" / "output" / "scan.h5"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    token, session = await reported(cp, link, sha256(outside), scan=2)
    await problem(await cp.call("GET", url(session, "diffraction.png", scan=2), token), 404,
                  "no-scan-file")
    assert opened_files == []


async def test_a_file_not_the_one_reported_is_refused(cp: ControlPlane) -> None:
    path = scan_file(cp.settings.jobs_dir / "job-changed" / "output")
    token, session = await reported(cp, path, sha="0" * 64)
    body = await problem(await cp.call("GET", url(session, "bright-field.png"), token), 409,
                         "scan-file-changed")
    assert "SHA-256 differs" in body["detail"]


async def test_a_file_without_electron_events_is_unprocessable(cp: ControlPlane) -> None:
    path = cp.settings.jobs_dir / "job-text" / "output" / "scan.h5"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an HDF5 file")
    token, session = await reported(cp, path)
    body = await problem(await cp.call("GET", url(session, "bright-field.png"), token), 422,
                         "unprocessable-scan-file")
    assert "cannot read the electron events" in body["detail"]


async def test_a_missing_file_a_scan_without_result_and_an_unknown_picture_are_404(
        cp: ControlPlane) -> None:
    path = scan_file(cp.settings.jobs_dir / "job-gone" / "output")
    token, session = await reported(cp, path)
    for picture in ("virtual-dark-field.png", "bright-field.jpg", "..%2Fdsn.yaml"):
        response = await cp.call("GET", url(session, picture), token)
        assert response.status == 404, picture
    await problem(await cp.call("GET", url(session, "bright-field.png", scan=9), token), 404,
                  "no-scan-file")
    path.unlink()
    await problem(await cp.call("GET", url(session, "bright-field.png"), token), 404,
                  "no-scan-file")

