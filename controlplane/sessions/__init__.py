"""Streaming sessions, their consumers, consumer jobs and scan results (SPEC §3, §4, §7).

A session's life: a project token opens it (template, parameters, the producer's CURVE public key);
the policy decides at the gate; the DSN template is rendered and validated; the session, its
rendered configuration (JSON) and its session token's metadata are stored in one transaction,
under the project's session quota; the caller gets the session token once, with the gateway's
endpoint and server key. HPC consumer ranks register their endpoints with a consumer token and
hold a lease that heartbeats renew; ``POST .../jobs`` renders a job template and submits it
through the configured launcher; rank 0 reports each scan's result. A session ends when deleted
(its session token is revoked at once and its jobs' consumer tokens at the end of the drain window,
``drain_s``, in the same transaction; the jobs are cancelled, and their ranks finish and report the
scans they hold meanwhile) or when it expires.

Session state and lease state are pure functions of the stored record and the clock
(``session_state``, ``lease_state``): nothing sweeps expired rows, and a moved clock expires them.

Authorization: every route's resource names the session's real project, looked up before the policy
decides, so a token of another project is refused with 403 (rule ``cross-project``) and audited. A
session id that does not exist is 404 before any decision (ids are 128 random bits: the answer
reveals nothing guessable). ``sessions:open`` is template-bound: opening a session, or submitting a
consumer job, names the DSN or job template the project must be allowed to use.

Layout: ``models`` (request and response bodies), ``core`` (pure states, limits, records, admission
and endpoint checks), ``repository`` (the SQL over ``Store.read``/``Store.write``), ``service``
(operations over the services: tokens, templates, launchers, publishing) and ``api`` (the aiohttp
handlers and ``ROUTES``).
"""
