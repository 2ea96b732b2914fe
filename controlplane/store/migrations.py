"""The store's schema, as ordered steps: ``MIGRATIONS[i]`` upgrades a database from version ``i``
to ``i + 1`` (SQLite's ``PRAGMA user_version``, PostgreSQL's ``schema_version`` table).

One list for both engines, in SQLite's dialect; the PostgreSQL backend translates each statement
(``dialect``: its types, ``INTEGER`` as ``BIGINT``, ``REAL`` as ``DOUBLE PRECISION``). The runners
stay in the backends (``sqlite``, ``postgresql``), which run every pending step when the store
opens, each in its own transaction with its version, and refuse a database newer than
``SCHEMA_VERSION``.
"""

from __future__ import annotations

# Ordered schema steps; never edit a released step, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 0 -> 1: projects, issued tokens (metadata only, never the token), public signing keys.
    (
        """CREATE TABLE projects (
            name TEXT PRIMARY KEY,
            allowed_templates TEXT NOT NULL,
            quotas TEXT NOT NULL,
            not_before REAL,
            created_at REAL NOT NULL)""",
        """CREATE TABLE tokens (
            jti TEXT PRIMARY KEY,
            project TEXT,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            scope TEXT NOT NULL,
            issued_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL,
            parent_jti TEXT REFERENCES tokens(jti))""",
        "CREATE INDEX tokens_by_project ON tokens(project, expires_at)",
        """CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            retired_at REAL,
            public_jwk TEXT NOT NULL)""",
    ),
    # 1 -> 2: the hash-chained audit log and its head, kept apart so a deleted tail shows.
    (
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            principal TEXT NOT NULL,
            action TEXT NOT NULL,
            resource TEXT NOT NULL,
            decision TEXT NOT NULL,
            rule TEXT NOT NULL,
            request_id TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL)""",
        """CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq INTEGER NOT NULL,
            hash TEXT NOT NULL)""",
    ),
    # 2 -> 3: template versions, append-only; the current one is the highest, a tombstone
    # (deleted = 1, empty source) hides the template while its history stays.
    (
        """CREATE TABLE template_versions (
            name TEXT NOT NULL,
            version INTEGER NOT NULL CHECK (version >= 1),
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            author TEXT NOT NULL,
            created_at REAL NOT NULL,
            deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
            PRIMARY KEY (name, version))""",
    ),
    # 3 -> 4: streaming sessions (rendered config as JSON), consumer leases, consumer jobs and
    # scan results (one per session and scan). State and leases are judged against the clock.
    (
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            project TEXT NOT NULL,
            template TEXT NOT NULL,
            template_version INTEGER NOT NULL,
            params TEXT NOT NULL,
            client_key TEXT NOT NULL,
            config TEXT NOT NULL,
            token_jti TEXT NOT NULL REFERENCES tokens(jti),
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            ended_at REAL)""",
        "CREATE INDEX sessions_by_project ON sessions(project, expires_at)",
        "CREATE INDEX sessions_by_client_key ON sessions(client_key, expires_at)",
        """CREATE TABLE consumers (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id),
            job_id TEXT NOT NULL,
            rank INTEGER NOT NULL,
            endpoint TEXT NOT NULL,
            host TEXT NOT NULL,
            registered_at REAL NOT NULL,
            lease_expires_at REAL NOT NULL,
            left_at REAL)""",
        "CREATE INDEX consumers_by_session ON consumers(session_id, lease_expires_at)",
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL REFERENCES sessions(id),
            template TEXT NOT NULL,
            template_version INTEGER NOT NULL,
            launcher TEXT NOT NULL,
            native_id TEXT NOT NULL,
            workdir TEXT NOT NULL,
            ranks INTEGER NOT NULL,
            token_jti TEXT NOT NULL REFERENCES tokens(jti),
            submitted_at REAL NOT NULL)""",
        "CREATE INDEX jobs_by_session ON jobs(session_id)",
        """CREATE TABLE scan_results (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            scan INTEGER NOT NULL,
            project TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            events INTEGER NOT NULL,
            expected_sectors INTEGER NOT NULL,
            received_sectors INTEGER NOT NULL,
            duplicate_sectors INTEGER NOT NULL,
            lost_sectors INTEGER NOT NULL,
            incomplete_frames INTEGER NOT NULL,
            status TEXT NOT NULL,
            reported_at REAL NOT NULL,
            PRIMARY KEY (session_id, scan))""",
        "CREATE INDEX scan_results_by_project ON scan_results(project, reported_at)",
    ),
    # 4 -> 5: a scan may also be reported by the gateway (``source``), which interrupted it when a
    # consumer left mid-scan: the key gains the source, and gateway reports carry the sectors
    # spooled, the losses by reason and the loss manifest itself (JSON); ``reason`` says why a
    # scan failed (its file could not be written) or was interrupted.
    (
        """CREATE TABLE scan_results_v5 (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            scan INTEGER NOT NULL,
            project TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            events INTEGER NOT NULL,
            expected_sectors INTEGER NOT NULL,
            received_sectors INTEGER NOT NULL,
            duplicate_sectors INTEGER NOT NULL,
            lost_sectors INTEGER NOT NULL,
            incomplete_frames INTEGER NOT NULL,
            status TEXT NOT NULL,
            reported_at REAL NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('consumer', 'gateway')),
            spooled_sectors INTEGER NOT NULL,
            lost_by_reason TEXT NOT NULL,
            loss_manifest TEXT NOT NULL,
            manifest_truncated INTEGER NOT NULL CHECK (manifest_truncated IN (0, 1)),
            reason TEXT,
            PRIMARY KEY (session_id, scan, source))""",
        """INSERT INTO scan_results_v5 SELECT session_id, scan, project, path, sha256, frames,
            events, expected_sectors, received_sectors, duplicate_sectors, lost_sectors,
            incomplete_frames, status, reported_at, 'consumer', 0, '{}', '[]', 0, NULL
            FROM scan_results""",
        "DROP TABLE scan_results",
        "ALTER TABLE scan_results_v5 RENAME TO scan_results",
        "CREATE INDEX scan_results_by_project ON scan_results(project, reported_at)",
    ),
    # 5 -> 6: a consumer counts the duplicate sectors whose content differed from the first copy
    # (none in the results stored before).
    (
        "ALTER TABLE scan_results ADD COLUMN conflicting_duplicates INTEGER NOT NULL DEFAULT 0",
    ),
    # 6 -> 7: an audit record may sum up repeated denials; those before each stand for one.
    (
        "ALTER TABLE audit ADD COLUMN count INTEGER NOT NULL DEFAULT 1 CHECK (count >= 1)",
    ),
    # 7 -> 8: admins are named principals (an admin token's ``sub`` names one); removing one sets
    # ``removed_at``. Every subject that held an admin token before becomes an active admin, so
    # an upgraded state directory keeps its admins (the first one was called ``admin``).
    (
        """CREATE TABLE admins (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL,
            removed_at REAL)""",
        """INSERT INTO admins SELECT subject, MIN(issued_at), 'upgrade', NULL FROM tokens
            WHERE kind = 'admin' GROUP BY subject""",
    ),
    # 8 -> 9: a job's last known state is stored, so that it survives a restart. Jobs stored before
    # are not known to have finished ('pending'): the next start asks their launcher again.
    (
        """ALTER TABLE jobs ADD COLUMN state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN
            ('pending', 'running', 'succeeded', 'failed', 'cancelled', 'lost'))""",
        "ALTER TABLE jobs ADD COLUMN exit_code INTEGER",
        "ALTER TABLE jobs ADD COLUMN detail TEXT NOT NULL DEFAULT ''",
    ),
    # 9 -> 10: the web console's sign-ins, each bound to the verified claims of the token it was
    # opened with (never the token, never the cookie: ``id`` is the cookie secret's hash).
    (
        """CREATE TABLE console_sessions (
            id TEXT PRIMARY KEY,
            claims TEXT NOT NULL,
            jti TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            ended_at REAL)""",
        "CREATE INDEX console_sessions_by_expiry ON console_sessions(expires_at)",
    ),
    # 10 -> 11: replicas on one database. Each signs with its own key, so when a key stopped
    # signing is stored (its replica rotated it) instead of inferred from the next newer key; a
    # key stored before stopped when the next one was created. Rate-limit hits are counted in
    # the database (per limit and window) when replicas share it.
    (
        "ALTER TABLE signing_keys ADD COLUMN stopped_at REAL",
        """UPDATE signing_keys SET stopped_at = (SELECT MIN(newer.created_at)
            FROM signing_keys newer WHERE newer.created_at > signing_keys.created_at)""",
        """CREATE TABLE rate_counters (
            name TEXT NOT NULL,
            window_start INTEGER NOT NULL,
            hits INTEGER NOT NULL,
            expires_at REAL NOT NULL,
            PRIMARY KEY (name, window_start))""",
        "CREATE INDEX rate_counters_by_expiry ON rate_counters(expires_at)",
    ),
    # 11 -> 12: gateways register themselves (``name`` is the allow-list file that admitted their
    # key); a session is placed on one (``gateway``; NULL: the configured single gateway, as
    # every session stored before), and moved off one whose heartbeats stopped
    # (``previous_gateway``, ``replaced_at``).
    (
        """CREATE TABLE gateways (
            name TEXT PRIMARY KEY,
            endpoint TEXT NOT NULL,
            receipts_endpoint TEXT NOT NULL,
            plain_endpoint TEXT,
            server_key TEXT NOT NULL,
            capacity INTEGER NOT NULL CHECK (capacity >= 1),
            registered_at REAL NOT NULL,
            last_seen REAL NOT NULL)""",
        "ALTER TABLE sessions ADD COLUMN gateway TEXT",
        "ALTER TABLE sessions ADD COLUMN previous_gateway TEXT",
        "ALTER TABLE sessions ADD COLUMN replaced_at REAL",
        "CREATE INDEX sessions_by_gateway ON sessions(gateway, ended_at)",
    ),
    # 12 -> 13: a session's scans may be split over several gateways (lanes): ``gateway`` carries
    # lane 0 and ``lane_gateways`` (a JSON list) lanes 1 and on. Each lane's gateway reports its
    # part of a scan no consumer reports, so the key of a result gains the ``lane`` (0: lane 0,
    # a scan of one lane, and the consumers' result, which merges every lane).
    (
        "ALTER TABLE sessions ADD COLUMN lane_gateways TEXT NOT NULL DEFAULT '[]'",
        """CREATE TABLE scan_results_v13 (
            session_id TEXT NOT NULL REFERENCES sessions(id),
            scan INTEGER NOT NULL,
            project TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            frames INTEGER NOT NULL,
            events INTEGER NOT NULL,
            expected_sectors INTEGER NOT NULL,
            received_sectors INTEGER NOT NULL,
            duplicate_sectors INTEGER NOT NULL,
            lost_sectors INTEGER NOT NULL,
            incomplete_frames INTEGER NOT NULL,
            status TEXT NOT NULL,
            reported_at REAL NOT NULL,
            source TEXT NOT NULL CHECK (source IN ('consumer', 'gateway')),
            spooled_sectors INTEGER NOT NULL,
            lost_by_reason TEXT NOT NULL,
            loss_manifest TEXT NOT NULL,
            manifest_truncated INTEGER NOT NULL CHECK (manifest_truncated IN (0, 1)),
            reason TEXT,
            conflicting_duplicates INTEGER NOT NULL DEFAULT 0,
            lane INTEGER NOT NULL DEFAULT 0 CHECK (lane >= 0),
            PRIMARY KEY (session_id, scan, source, lane))""",
        """INSERT INTO scan_results_v13 SELECT session_id, scan, project, path, sha256, frames,
            events, expected_sectors, received_sectors, duplicate_sectors, lost_sectors,
            incomplete_frames, status, reported_at, source, spooled_sectors, lost_by_reason,
            loss_manifest, manifest_truncated, reason, conflicting_duplicates, 0
            FROM scan_results""",
        "DROP TABLE scan_results",
        "ALTER TABLE scan_results_v13 RENAME TO scan_results",
        "CREATE INDEX scan_results_by_project ON scan_results(project, reported_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
