"""One place for configuration: every setting, its default and its environment variable.

Settings are read from environment variables named ``FACEGRID_<SECTION>__<FIELD>``
(for example ``FACEGRID_INFERENCE__BACKEND=triton``) and can be overridden on the
command line with ``--set section.field=value``. The defaults are the embedded,
one-machine configuration: in-process onnxruntime and local files.
"""

from __future__ import annotations

import argparse
import json
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "FACEGRID_"
ENV_NESTED_DELIMITER = "__"


class Section(BaseModel):
    """A settings section: unknown fields are errors, so a misspelt variable is caught."""

    model_config = ConfigDict(extra="forbid")


class InferenceBackendKind(StrEnum):
    LOCAL = "local"
    TRITON = "triton"


class InferenceSettings(Section):
    backend: InferenceBackendKind = Field(
        InferenceBackendKind.LOCAL,
        description="'local' runs the ONNX models in-process with onnxruntime; "
        "'triton' sends them to a Triton Inference Server over gRPC.",
    )
    model_repository: Path = Field(
        Path("model_repository"),
        description="Triton-layout model repository written by `facegrid models build`; "
        "the local backend reads <model>/1/model.onnx from it.",
    )
    triton_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (host:port).")
    triton_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one Triton inference call, in seconds."
    )
    intra_op_threads: int = Field(
        0, ge=0, description="onnxruntime threads per session for the local backend (0: all cores)."
    )
    allow_spinning: bool = Field(
        False,
        description="Let the local backend's onnxruntime threads spin-wait between calls: "
        "a little lower latency for a lone caller, but they burn CPU (tens of ms per "
        "call) that other work on the machine needs.",
    )
    detector_model: str = Field("face_detector", description="Model name of the face detector.")
    embedder_model: str = Field("face_embedder", description="Model name of the face embedder.")


class ImageLimits(Section):
    max_bytes: int = Field(
        15 * 1024 * 1024, gt=0, description="Largest accepted encoded image, in bytes."
    )
    max_pixels: int = Field(
        40_000_000,
        gt=0,
        description="Largest accepted decoded image, in pixels (width x height); "
        "guards against decompression bombs.",
    )
    max_side: int = Field(
        12_000, gt=0, description="Largest accepted image width or height, in pixels."
    )
    detect_max_side: int = Field(
        1600,
        gt=0,
        description="Images whose longer side exceeds this are shrunk before detection; "
        "boxes are reported in the original image's pixels.",
    )


class DetectionSettings(Section):
    port: int = Field(50051, ge=0, le=65535, description="gRPC port of the detection service.")
    metrics_port: int = Field(
        9151, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    min_confidence: float = Field(
        50.0,
        ge=0,
        le=100,
        description="Faces below this confidence (0-100) are not returned when a request "
        "sets no min_confidence of its own.",
    )
    max_concurrent_rpcs: int = Field(
        16, gt=0, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    workers: int = Field(
        2, gt=0, description="Threads doing CPU work (decoding, pyramid, landmarks, chips)."
    )
    max_detection_pixels: int = Field(
        16_000_000,
        gt=0,
        description="Largest image, in pixels after enlarging, that the detector runs on: a "
        "request for small faces (min_face_size 40 or 20) enlarges the image 2 or 4 times, "
        "and is enlarged less where that would pass this (16 MP: a 1024x683 photo at 4x "
        "is 11 MP, about 6 s on 2 cores).",
    )


class EmbeddingSettings(Section):
    port: int = Field(50052, ge=0, le=65535, description="gRPC port of the embedding service.")
    metrics_port: int = Field(
        9152, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    max_batch: int = Field(
        32, gt=0, description="Most chips sent to the model in one inference call."
    )
    max_batch_delay_ms: float = Field(
        2.0,
        ge=0,
        description="How long the batcher waits for more chips before running a partial batch.",
    )
    max_queued_chips: int = Field(
        1024,
        gt=0,
        description="Bound of the batching queue; beyond it calls get RESOURCE_EXHAUSTED.",
    )
    max_chips_per_request: int = Field(256, gt=0, description="Most chips in one EmbedChips call.")
    mirror_average: bool = Field(
        True,
        description="Embed each chip and its mirror image and average the two (model "
        "version <model>+mirror): TAR at FMR 1e-4 on lfw-dev 84.4% instead of 79.4%, for "
        "twice the model time. Collections hold one model version: turn it off only to keep "
        "searching collections enrolled without it.",
    )
    max_concurrent_rpcs: int = Field(
        64, gt=0, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )


class SearchCache(StrEnum):
    AUTO = "auto"  # on for Milvus Lite (one process owns the file), off for a server
    ON = "on"
    OFF = "off"


class StoreSettings(Section):
    uri: str = Field(
        "var/facegrid.db",
        description="Milvus Lite database path (the embedded default) or a Milvus server "
        "URL such as http://milvus:19530.",
    )
    token: str = Field("", description="Milvus server token (user:password); empty: none.")
    index_type: str = Field(
        "AUTO",
        description="Milvus vector index of face collections: HNSW, FLAT, or AUTO (FLAT "
        "when the in-memory cache answers searches, since Milvus Lite builds an HNSW index "
        "on every flush, which made a 1M-face restart take many minutes; HNSW otherwise).",
    )
    hnsw_m: int = Field(16, ge=4, le=64, description="HNSW graph degree.")
    hnsw_ef_construction: int = Field(200, ge=8, le=512, description="HNSW build width.")
    hnsw_ef_search: int = Field(64, ge=1, le=4096, description="HNSW search width (>= top_k).")
    consistency_level: str = Field(
        "Strong",
        description="Milvus read consistency for a server: Strong makes every replica see "
        "every acknowledged write and delete at once (a search took 400 ms p50 on Milvus "
        "2.3 here, against 15 ms with Bounded, under which another replica returned every "
        "just-deleted face); Session suffices with one search replica. Milvus Lite ignores it.",
    )
    cache: SearchCache = Field(
        SearchCache.AUTO,
        description="In-memory exact index mirroring Milvus, rebuilt from it at start-up: "
        "'auto' uses it with Milvus Lite, whose own search scans rows in Python.",
    )
    index_snapshot: bool = Field(
        True,
        description="With Milvus Lite and the in-memory index: write the index beside the "
        "database (PATH.index) on a clean shutdown and use it at the next start when the "
        "database is unchanged and a sample matches Milvus (a 1M-face restart without it "
        "re-reads every row: minutes).",
    )
    timeout_s: float = Field(30.0, gt=0, description="Deadline of one Milvus call, in seconds.")
    compaction_delay_s: float = Field(
        60.0,
        ge=0,
        description="On a Milvus server: a collection with deleted faces or subjects is "
        "flushed and compacted within this many seconds, so that the deleted rows leave "
        "its segments (their old files go at Milvus's garbage collection, "
        "dataCoord.gc.dropTolerance). 0: never. Milvus Lite cannot purge (README).",
    )


class SearchSettings(Section):
    port: int = Field(50053, ge=0, le=65535, description="gRPC port of the search service.")
    metrics_port: int = Field(
        9153, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    max_concurrent_rpcs: int = Field(
        64, gt=0, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )


class QualityLevel(Section):
    """The thresholds of one QualityFilter level; a face must meet all of them."""

    min_confidence: float = Field(50.0, ge=0, le=100, description="Lowest detection confidence.")
    min_face_size: int = Field(
        40, ge=0, description="Shortest side of the face box, in pixels of the rotated image."
    )
    min_sharpness: float = Field(5.0, ge=0, le=100, description="Lowest sharpness (0-100).")
    min_brightness: float = Field(10.0, ge=0, le=100, description="Lowest brightness (0-100).")
    max_brightness: float = Field(95.0, ge=0, le=100, description="Highest brightness (0-100).")
    max_yaw: float = Field(
        60.0, ge=0, le=90, description="Largest head turn (absolute yaw), in degrees."
    )
    max_roll: float = Field(
        45.0, ge=0, le=180, description="Largest in-plane tilt (absolute roll), in degrees."
    )


class AutoQuality(StrEnum):
    NONE = "none"
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"


class GatewaySettings(Section):
    port: int = Field(50050, ge=0, le=65535, description="gRPC port of the gateway (public API).")
    metrics_port: int = Field(
        9150, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    detection_address: str = Field(
        "127.0.0.1:50051", description="host:port of the detection service."
    )
    embedding_address: str = Field(
        "127.0.0.1:50052", description="host:port of the embedding service."
    )
    search_address: str = Field("127.0.0.1:50053", description="host:port of the search service.")
    max_concurrent_rpcs: int = Field(
        64, gt=0, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    quotas: dict[str, dict[str, int]] = Field(
        {},
        description="Calls per minute a caller may make, shared by every gateway replica: "
        'keys "principal:NAME", "scope:SCOPE" or "default", each a map of '
        "identifications_per_minute (CompareFaces and the searches) and "
        "enrolments_per_minute (IndexFaces). A principal's own limit wins, else the "
        "largest of its scopes', else the default; none: unlimited.",
    )
    quota_path: str = Field(
        "var/quotas.db",
        description="SQLite file of the quota counts when gateway.audit_database_url is "
        "unset (the gateways of one machine); with it, the counts live in that database.",
    )
    credentials_file: Path = Field(
        Path("var/credentials.json"),
        description="Callers and their scopes: JSON with the SHA-256 of each bearer token "
        "(`facegrid token create` writes it). Read at start-up.",
    )
    audit_path: Path = Field(
        Path("var/audit.db"),
        description="The audit log (SQLite, hash-chained), appended to by the gateway and "
        "the ingest service on one machine (one chain; never forked). Unused when "
        "audit_database_url is set.",
    )
    audit_database_url: str = Field(
        "",
        description="PostgreSQL audit log shared by every gateway and ingest replica, as a "
        "libpq URL (postgresql://user@host:port/db); keep the password out of it (PGPASSFILE "
        "or PGPASSWORD). Empty: SQLite at audit_path.",
    )
    retention_interval_s: float = Field(
        600.0,
        gt=0,
        le=3600,
        description="How often faces older than their collection's face_retention are "
        "deleted, each deletion recorded in the audit log (by one gateway replica at a "
        "time). At most 1 h: the contract promises removal within an hour of expiry.",
    )
    audit_signing_key_file: Path = Field(
        Path("var/audit-signing.key"),
        description="Ed25519 private key (PEM) that signs audit checkpoints; created (mode "
        "0600, with its public key beside it as .pub) when missing. Give every gateway "
        "replica the same key.",
    )
    min_similarity: float | None = Field(
        None,
        ge=0,
        le=100,
        description="The administrator's minimum match threshold (0-100) for every "
        "identification call; callers may ask for more, never less. Unset: the "
        "calibration's default, 80, the lowest similarity whose measured false match rate "
        "has an upper 95% bound of at most 1e-4 (see the README's threshold table).",
    )
    purpose_min_similarity: dict[str, float] = Field(
        default_factory=dict,
        description='Minimums per purpose, e.g. {"PURPOSE_TESTING": 90}; the larger of '
        "this and min_similarity applies. A purpose not named here keeps the calibration's "
        "default: 90 for PURPOSE_WATCHLIST_MONITORING (FMR at most 1e-5), where every "
        "passer-by is compared.",
    )
    auto_quality: AutoQuality = Field(
        AutoQuality.LOW, description="The level QUALITY_FILTER_AUTO stands for."
    )
    quality_low: QualityLevel = Field(
        default_factory=QualityLevel, description="QUALITY_FILTER_LOW thresholds."
    )
    quality_medium: QualityLevel = Field(
        default_factory=lambda: QualityLevel(
            min_confidence=70,
            min_face_size=60,
            min_sharpness=15,
            min_brightness=15,
            max_brightness=90,
            max_yaw=40,
            max_roll=30,
        ),
        description="QUALITY_FILTER_MEDIUM thresholds.",
    )
    quality_high: QualityLevel = Field(
        default_factory=lambda: QualityLevel(
            min_confidence=90,
            min_face_size=100,
            min_sharpness=30,
            min_brightness=25,
            max_brightness=85,
            max_yaw=25,
            max_roll=15,
        ),
        description="QUALITY_FILTER_HIGH thresholds.",
    )
    probe_quality: QualityLevel = Field(
        default_factory=lambda: QualityLevel(
            min_confidence=50,
            min_face_size=40,
            min_sharpness=5,
            min_brightness=10,
            max_brightness=95,
            max_yaw=60,
            max_roll=45,
        ),
        description="The least a face must meet to be searched with (SearchFacesByImage, "
        "SearchSubjectsByImage, the source of CompareFaces), whatever quality_filter the "
        "caller asks for (QUALITY_FILTER_NONE included): a probe too small, blurred, dark "
        "or turned away is refused with FACE_QUALITY naming the measure. What these "
        "limits cost in true accepts on LFW is in the README.",
    )
    downstream_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of one call to detection, embedding or search."
    )


class IngestSettings(Section):
    port: int = Field(50054, ge=0, le=65535, description="gRPC port of the ingest service.")
    metrics_port: int = Field(
        9154, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    detection_address: str = Field(
        "127.0.0.1:50051", description="host:port of the detection service."
    )
    embedding_address: str = Field(
        "127.0.0.1:50052", description="host:port of the embedding service."
    )
    search_address: str = Field("127.0.0.1:50053", description="host:port of the search service.")
    downstream_timeout_s: float = Field(
        10.0, gt=0, description="Deadline of one call to detection, embedding or search."
    )
    max_concurrent_rpcs: int = Field(
        64, gt=0, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS server with JetStream: match events, processors, source leases.",
    )
    nats_store_dir: Path = Field(
        Path("var/nats"),
        description="Where `facegrid up` keeps its local nats-server's JetStream data (when "
        "nats_url names this machine).",
    )
    replica_id: str = Field(
        "",
        description="This replica's name in source leases; empty: host name and process id.",
    )
    lease_s: float = Field(
        10.0,
        ge=1,
        le=300,
        description="How long a replica holds a source without renewing it: a replica "
        "killed without handing over loses its sources to the others after this.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts a pull URL may name: names, *.suffix patterns, CIDR ranges, or "
        '"*" for any. Empty: no network source (PERMISSION_DENIED).',
    )
    allowed_dirs: list[Path] = Field(
        default_factory=list,
        description="Folders a file:// source may read from. Empty: no file source.",
    )
    max_processors: int = Field(256, gt=0, description="Most stream processors.")
    max_sources_per_replica: int = Field(
        64, gt=0, description="Most sources one replica reads at once; others wait for a replica."
    )
    max_batch_frames: int = Field(
        8, gt=0, description="Most sampled frames (of all sources) processed as one batch."
    )
    max_batch_wait_s: float = Field(
        0.05, ge=0, description="How long a batch waits for more frames once it has one."
    )
    max_frame_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest pushed frame, encoded, in bytes."
    )
    full_frame_interval_s: float = Field(
        1.5,
        ge=0,
        le=2.0,
        description="Sampled frames are searched for faces in full at least this often "
        "(new faces are found within it); in between, only around the tracks that still "
        "want a better shot, and not at all when none does. 0: every frame in full. At "
        "most 2 s, the tracker's gap, so that tracks live across it.",
    )
    event_max_age_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="Match events (with their best-shot chips) older than this are erased "
        "every event_retention_interval_s, each sweep recorded in the audit log. The "
        "stream's own age limit, a day later, is the backstop should no replica sweep.",
    )
    erasure_interval_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="How often the match events that name a deleted face, subject or "
        "collection are erased (one ingest replica at a time, following the audit log).",
    )
    event_retention_interval_s: float = Field(
        600.0,
        gt=0,
        le=3600,
        description="How often expired match events are erased (by one ingest replica at a time).",
    )
    event_max_bytes: int = Field(
        10 * 1024**3, gt=0, description="The event stream's size limit; oldest deleted first."
    )
    event_replicas: int = Field(
        1, ge=1, le=5, description="JetStream replicas of the event stream (a NATS cluster)."
    )


class ConsoleSettings(Section):
    port: int = Field(
        8080, ge=0, le=65535, description="HTTP(S) port of the examiner console (web pages)."
    )
    metrics_port: int = Field(
        9155, ge=0, le=65535, description="HTTP port of its Prometheus /metrics (0: off)."
    )
    gateway_address: str = Field(
        "127.0.0.1:50050", description="host:port of the gateway the console calls."
    )
    ingest_address: str = Field(
        "127.0.0.1:50054", description="host:port of the ingest service the console calls."
    )
    tls_server_name: str = Field(
        "",
        description="The name the gateway's and ingest's certificate is checked for, when "
        "the console calls them by another (in-cluster) name; empty: the address's host.",
    )
    call_timeout_s: float = Field(
        60.0, gt=0, description="Deadline of one call of the console to the gateway or ingest."
    )
    session_key_file: Path = Field(
        Path("var/console-session.key"),
        description="Key that encrypts and signs sign-in cookies (created if missing, "
        "mode 0600); every replica behind one address must read the same file.",
    )
    session_ttl_s: float = Field(
        8 * 3600.0,
        gt=0,
        description="How long a sign-in lasts; the person then signs in again.",
    )
    max_upload_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest photo a page accepts (then 413)."
    )
    max_event_streams: int = Field(
        64, gt=0, description="Live alert views open at once; more are refused (503)."
    )
    max_connections: int = Field(
        256, gt=0, description="HTTP connections served at once; more are answered 503."
    )
    public_url: str = Field(
        "",
        description="The console's address as browsers reach it (https://console.example.org), "
        "for the OIDC sign-in's redirect URI; empty: the address of each request.",
    )
    oidc_client_id: str = Field(
        "",
        description="The console's client id at the OIDC provider (oidc.issuer): people then "
        "sign in on the provider's page (authorization code with PKCE). Empty: tokens only.",
    )
    oidc_client_secret_file: str = Field(
        "",
        description="File holding the client's secret, for a confidential client; empty: a "
        "public client (PKCE alone).",
    )
    oidc_discovery_url: str = Field(
        "",
        description="The provider's OpenID configuration; empty: "
        "oidc.issuer + /.well-known/openid-configuration.",
    )
    oidc_scopes: str = Field(
        "openid", description="Scopes the console asks the provider for (space-separated)."
    )


class ServerSettings(Section):
    host: str = Field("127.0.0.1", description="Address the gRPC servers bind to.")
    health_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="A port serving only grpc.health.v1, in plaintext, for Kubernetes' "
        "gRPC probes (which cannot speak TLS); 0: none (health is on the service's port).",
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    max_message_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest gRPC message accepted or sent."
    )
    drain_s: float = Field(
        1.0,
        ge=0,
        description="On SIGTERM, how long health says NOT_SERVING before the server stops "
        "taking calls, so that clients and load balancers move new calls elsewhere first.",
    )
    max_connection_age_s: float = Field(
        5.0,
        ge=0,
        description="A client connection is asked to reconnect (HTTP/2 GOAWAY) after this "
        "long (gRPC adds 10% jitter), so that clients re-resolve the service's name and "
        "spread over replicas added since; calls in flight, streams included, run to "
        "their end on the old connection. 0: never.",
    )
    max_connection_age_grace_s: float = Field(
        0.0,
        ge=0,
        description="How long calls still running on a connection past its age may go on "
        "before it is closed. 0: until they end (long streams such as StreamMatchEvents "
        "are never cut).",
    )
    keepalive_time_s: float = Field(
        30.0,
        gt=0,
        description="Idle connections are pinged this often, so that a peer that vanished "
        "(a killed pod, a dropped NAT entry) is noticed; clients may ping as often.",
    )
    keepalive_timeout_s: float = Field(
        10.0, gt=0, description="A ping not answered within this closes the connection."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        "json", description="'json': one JSON object per line; 'text': for people."
    )


class OidcSettings(Section):
    issuer: str = Field(
        "",
        description="OIDC issuer whose access tokens (JWT) the gateway and ingest accept, "
        "besides the credentials file; its tokens must carry exactly this iss. Empty: off.",
    )
    audience: str = Field("facegrid", description="The aud the tokens must carry.")
    jwks_url: str = Field(
        "",
        description="The issuer's JWKS (its public keys); https, or http on a loopback "
        "address. Fetched at the first token and when a token names an unknown key id.",
    )
    algorithms: list[str] = Field(
        ["RS256", "ES256"],
        description="Signature algorithms accepted (the token's header is trusted for "
        "nothing else): asymmetric ones only.",
    )
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock leeway for exp and nbf.")
    scope_claim: str = Field(
        "scope",
        description="Claim holding the facegrid scopes: a space-separated string or a list.",
    )
    principal_claim: str = Field(
        "sub", description="Claim naming the caller, as audit records show it."
    )
    purpose_claim: str = Field(
        "facegrid_purposes",
        description="Claim listing the identification purposes the caller may use "
        "(PURPOSE_... names, a list or a space-separated string); absent: any.",
    )
    jwks_min_refresh_s: float = Field(
        10.0, ge=0, description="An unknown key id refetches the JWKS at most this often."
    )
    jwks_timeout_s: float = Field(5.0, gt=0, description="Deadline of a JWKS fetch.")

    @model_validator(mode="after")
    def _complete(self) -> OidcSettings:
        if self.issuer and not self.jwks_url:
            raise ValueError("oidc.issuer needs oidc.jwks_url")
        weak = [a for a in self.algorithms if not a.startswith(("RS", "PS", "ES", "Ed"))]
        if weak:
            raise ValueError(f"oidc.algorithms must be asymmetric, not {weak}")
        return self


class TlsSettings(Section):
    cert_file: str = Field(
        "",
        description="PEM certificate chain the gRPC server presents (TLS); re-read when the "
        "file changes. Empty: plaintext, allowed on a loopback server.host only.",
    )
    key_file: str = Field("", description="PEM private key of tls.cert_file.")
    client_ca_file: str = Field(
        "",
        description="PEM CA bundle: when set, callers must present a certificate it issued "
        "(mutual TLS; set it on the internal services, not on the gateway's public port).",
    )
    ca_file: str = Field(
        "",
        description="PEM CA bundle the servers this process calls must chain to (the "
        "gateway's and ingest's internal calls, ingest's NATS, Triton and Milvus, the facegrid "
        "client). Empty: plaintext, and only to loopback addresses.",
    )
    client_cert_file: str = Field(
        "",
        description="PEM certificate chain presented to the servers this process calls "
        "(mutual TLS); read when a channel is made.",
    )
    client_key_file: str = Field("", description="PEM private key of tls.client_cert_file.")

    @model_validator(mode="after")
    def _pairs(self) -> TlsSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise ValueError("tls.client_cert_file and tls.client_key_file go together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        if self.client_cert_file and not self.ca_file:
            raise ValueError("tls.client_cert_file needs tls.ca_file")
        return self


class Settings(BaseSettings):
    """All of facegrid's settings. Nested sections map to ``FACEGRID_<SECTION>__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_NESTED_DELIMITER, extra="forbid"
    )

    server: ServerSettings = ServerSettings()
    tls: TlsSettings = TlsSettings()
    oidc: OidcSettings = OidcSettings()
    inference: InferenceSettings = InferenceSettings()
    images: ImageLimits = ImageLimits()
    detection: DetectionSettings = DetectionSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    search: SearchSettings = SearchSettings()
    store: StoreSettings = StoreSettings()
    gateway: GatewaySettings = GatewaySettings()
    ingest: IngestSettings = IngestSettings()
    console: ConsoleSettings = ConsoleSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The defaults as the lowest source: pydantic-settings merges sources deeply, so
        # a variable that sets one field of a nested model (FACEGRID_GATEWAY__QUALITY_
        # MEDIUM__MIN_CONFIDENCE) keeps that model's other defaults instead of its
        # class's (which are LOW's for every quality level).
        return (init_settings, env_settings, _DefaultsSource(settings_cls))


class _DefaultsSource(PydanticBaseSettingsSource):
    """Every section's default value, dumped: the base the other sources update."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return {
            name: field.get_default(call_default_factory=True).model_dump()
            for name, field in self.settings_cls.model_fields.items()
        }


def add_overrides_argument(parser: argparse.ArgumentParser, help_text: str = "") -> None:
    """The repeatable ``--set section.field=value`` option of every command that runs code."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help=help_text or "override a setting (repeatable), e.g. --set inference.backend=triton",
    )


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ``["inference.backend=triton", ...]`` into a nested dict for Settings(**...).

    A value that starts with ``[`` or ``{`` is JSON, as in environment variables, for
    list and mapping settings: ``ingest.allowed_hosts=["10.0.0.0/8"]``."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected section.field=value, got {pair!r}")
        node = nested
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        text = value.strip()
        if text[:1] in ("[", "{"):
            try:
                node[leaf] = json.loads(text)
                continue
            except json.JSONDecodeError as error:
                raise ValueError(f"{key}: not valid JSON: {error}") from None
        node[leaf] = value
    return nested


def load_settings(overrides: list[str] | None = None) -> Settings:
    """Settings from the environment, then command-line overrides on top."""
    base = Settings()
    if not overrides:
        return base
    merged = _deep_merge(base.model_dump(), parse_overrides(overrides))
    return Settings.model_validate(merged)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
