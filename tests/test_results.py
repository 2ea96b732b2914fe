"""The scan result record: the rule a consumer's result keeps, and the HTTP body and the stored
record carrying exactly its fields."""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace

import pytest
from pydantic import ValidationError

from common.errors import DsnError
from common.protocol import MAX_MANIFEST
from common.results import ResultError, ScanResult, check
from controlplane.sessions.core import ScanRecord
from controlplane.sessions.models import ScanDetail, ScanOut, ScanReport

SHA = hashlib.sha256(b"scan").hexdigest()
COMPLETE = ScanResult(
    session="beam-1", scan=7, path="/data/out/scan-7.h5", sha256=SHA, frames=16, events=120,
    expected_sectors=64, received_sectors=64, duplicate_sectors=0, conflicting_duplicates=0,
    lost_sectors=0, incomplete_frames=0, status="complete", loss_manifest=(),
    manifest_truncated=False)
LOST = ((3, 0, "not_received"), (3, 1, "not_received"), (3, 2, "invalid_header"),
        (3, 3, "not_received"))
CONFLICT = (5, 0, "conflicting_duplicate")
PARTIAL = replace(COMPLETE, status="partial", received_sectors=60, lost_sectors=4,
                  incomplete_frames=1, loss_manifest=LOST)
FAILED = replace(COMPLETE, status="failed", sha256="", reason="No space left on device")


@pytest.mark.parametrize("result", [
    COMPLETE, PARTIAL, FAILED, replace(PARTIAL, lost_sectors=0, loss_manifest=()),
    replace(PARTIAL, lost_sectors=MAX_MANIFEST + 1,
            loss_manifest=((0, 0, "not_received"),) * MAX_MANIFEST, manifest_truncated=True),
    replace(PARTIAL, conflicting_duplicates=1, loss_manifest=LOST + (CONFLICT,))])
def test_results_that_keep_the_rule_pass(result: ScanResult) -> None:
    check(result)


@pytest.mark.parametrize(("result", "message"), [
    (replace(COMPLETE, lost_sectors=1), "not complete"),
    (replace(COMPLETE, incomplete_frames=1), "not complete"),
    (replace(FAILED, sha256=SHA), "a failed scan has no sha256 and a reason"),
    (replace(FAILED, reason=None), "a failed scan has no sha256 and a reason"),
    (replace(PARTIAL, sha256=""), "any other has a sha256 and no reason"),
    (replace(COMPLETE, reason="why"), "any other has a sha256 and no reason"),
    (replace(COMPLETE, conflicting_duplicates=1, loss_manifest=(CONFLICT,)), "not complete"),
    # A count of lost sectors with no list of them: the manifest is where the count is.
    (replace(PARTIAL, loss_manifest=()), "lists 0 of 4 lost sectors"),
    (replace(PARTIAL, loss_manifest=LOST[:3]), "lists 3 of 4 lost sectors"),
    (replace(PARTIAL, loss_manifest=LOST * 2), "lists 8 of 4 lost sectors"),
    (replace(PARTIAL, manifest_truncated=True), "lists 4 of 4 lost sectors"),
    (replace(PARTIAL, conflicting_duplicates=1), "lists 4 of 5 lost sectors"),
    (replace(PARTIAL, lost_sectors=MAX_MANIFEST + 2, manifest_truncated=True,
             loss_manifest=LOST * (MAX_MANIFEST // 4) + LOST[:1]), "up to 65536"),
])
def test_results_that_break_the_rule_are_refused(result: ScanResult, message: str) -> None:
    with pytest.raises(ResultError, match=message) as refused:
        check(result)
    assert isinstance(refused.value, DsnError)


def _body(result: ScanResult) -> dict[str, object]:
    body = {f.name: getattr(result, f.name) for f in fields(result)}
    del body["session"], body["scan"]
    return body


def test_the_http_body_is_the_record_without_its_session_and_scan() -> None:
    names = {f.name for f in fields(ScanResult)}
    assert set(ScanReport.model_fields) == names - {"session", "scan"}
    for result in (COMPLETE, PARTIAL, FAILED):
        assert ScanReport.model_validate(_body(result)).result("beam-1", 7) == result


def test_the_http_body_keeps_the_same_rule() -> None:
    with pytest.raises(ValidationError, match="is not complete"):
        ScanReport.model_validate(_body(replace(COMPLETE, lost_sectors=1)))
    with pytest.raises(ValidationError, match="lists 0 of 4 lost sectors"):
        ScanReport.model_validate(_body(replace(PARTIAL, loss_manifest=())))


@pytest.mark.parametrize("entry", [
    (-1, 0, "not_received"), (2**32, 0, "not_received"), (0, 64, "not_received"),
    (0, -1, "not_received"), (0, 0, "Not_Received"), (0, 0, ""), (0, 0, "x" * 41),
    (0, 0, "not_received", 1), (0, 0)])
def test_the_http_body_bounds_every_manifest_entry(entry: tuple[object, ...]) -> None:
    with pytest.raises(ValidationError, match="loss_manifest"):
        ScanReport.model_validate_json(json.dumps(
            {**_body(PARTIAL), "loss_manifest": [entry, *LOST[1:]]}))


def test_the_http_body_bounds_the_manifest_length() -> None:
    listed = LOST * (MAX_MANIFEST // 4 + 1)
    body = {**_body(PARTIAL), "lost_sectors": len(listed), "loss_manifest": listed}
    with pytest.raises(ValidationError, match="at most 65536 items"):
        ScanReport.model_validate_json(json.dumps(body))


def test_the_stored_record_is_the_result_with_who_reported_it_and_when() -> None:
    record = ScanRecord.of(FAILED, project="alpha", reported_at=1.5)
    assert {f.name: getattr(record, f.name) for f in fields(ScanResult)} == {
        f.name: getattr(FAILED, f.name) for f in fields(ScanResult)}
    assert (record.project, record.reported_at, record.source) == ("alpha", 1.5, "consumer")


def test_the_listed_scans_carry_the_stored_record_fields() -> None:
    stored = {f.name for f in fields(ScanRecord)}
    assert set(ScanDetail.model_fields) == stored
    assert set(ScanOut.model_fields) == stored - {"loss_manifest", "manifest_truncated"}
