"""The examiner console: web pages over the gateway and ingest (`facegrid serve console`).

People search a gallery with a probe photo, review each candidate and watch-list alert,
and record their decisions; enrol and delete faces; read and verify the audit log. The
console holds no data and no authority of its own: every page calls the gateway or
ingest over gRPC with the signed-in person's own token, so it can do exactly what that
person could do with the API, and every call is audited there.
"""
