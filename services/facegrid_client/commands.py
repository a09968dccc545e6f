"""The ``facegrid`` client commands: collections, enrolment, search, comparison, audit.

Each command makes FaceService calls to the gateway with the caller's bearer token
and a deadline, prints tables, and on failure prints the status code, the message
and the error details, one line each, and exits with 1. Identification commands
(``search``, ``search-face``, ``compare``) require ``--purpose`` and ``--case``:
they are written to the audit log, so they are never filled in silently.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from facegrid import audit_checkpoint, limits, validation
from facegrid.audit_chain import verify_chain
from facegrid.auth import read_token
from facegrid.rpc_errors import describe_rpc_error, status_code
from facegrid.v1 import common_pb2, resources_pb2
from facegrid.v1 import face_service_pb2 as fs
from google.protobuf import field_mask_pb2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from facegrid_client import arguments, output
from facegrid_client.connection import (
    DEFAULT_DEADLINE_S,
    ClientError,
    FaceClient,
    default_address,
)
from facegrid_client.manifest import (
    COLLECTION_ID_PATTERN,
    QUALITY_CHOICES,
    SUBJECT_ID_PATTERN,
    Manifest,
    ManifestError,
    PhotoSpec,
    SubjectSpec,
    load_manifest,
)
from facegrid_client.photos import PhotoError, resolve_photo, safe_external_id
from facegrid_client.seeding import (
    DEFAULT_JOBS,
    QUALITY_FILTERS,
    PhotoResult,
    enrol,
    plan_folder,
    seed_with_client,
)

Handler = Callable[[argparse.Namespace, FaceClient], int]
Purpose = common_pb2.IdentificationContext.Purpose
# criminal-investigation, missing-person, ..., testing: every purpose but UNSPECIFIED.
PURPOSES = {
    value.name.removeprefix("PURPOSE_").replace("_", "-").lower(): value.name
    for value in Purpose.DESCRIPTOR.values
    if value.number != Purpose.PURPOSE_UNSPECIFIED
}
IMAGE_HELP = (
    "a JPEG or PNG file, or package:<module>/<path> (e.g. package:skimage/data/astronaut.png)"
)
PAGE_SIZE = 1000
MAX_DELETE_NAMES = 1000
# The gateway's limits (facegrid.validation), checked before anything is sent.
MAX_CASE_ID = validation.MAX_CASE_ID
MAX_JUSTIFICATION = validation.MAX_JUSTIFICATION


def register(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the client's sub-commands to the `facegrid` command."""
    connection = connection_options()
    identification = _identification_options()

    def leaf(
        group: argparse._SubParsersAction[Any],
        name: str,
        handler: Handler,
        help_text: str,
        *extra: argparse.ArgumentParser,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, parents=[connection, *extra]
        )
        parser.set_defaults(handler=_runner(handler))
        return parser

    _register_collections(commands, leaf)
    _register_enrolment(commands, leaf)
    _register_identification(commands, leaf, identification)
    _register_faces_subjects(commands, leaf)
    _register_audit(commands, leaf)


Leaf = Callable[..., argparse.ArgumentParser]


def _group(
    commands: argparse._SubParsersAction[Any], name: str, help_text: str
) -> argparse._SubParsersAction[Any]:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help_text, description=help_text
    )
    parser.set_defaults(handler=lambda _args: _usage(parser))
    group: argparse._SubParsersAction[Any] = parser.add_subparsers(title=f"{name} commands")
    return group


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _register_collections(commands: argparse._SubParsersAction[Any], leaf: Leaf) -> None:
    group = _group(commands, "collections", "create, list, describe and delete collections")
    create = leaf(group, "create", _collections_create, "create an empty collection")
    create.add_argument("collection_id", metavar="ID", type=_collection_id)
    create.add_argument("--display-name", default="")
    create.add_argument("--description", default="")
    create.add_argument(
        "--min-threshold",
        type=arguments.percentage,
        metavar="T",
        help="the collection's own minimum match threshold (never below the deployment's)",
    )
    update = leaf(
        group, "update", _collections_update, "change a collection's names or minimum threshold"
    )
    update.add_argument("collection", metavar="ID", type=_collection_name)
    update.add_argument("--display-name")
    update.add_argument("--description")
    threshold = update.add_mutually_exclusive_group()
    threshold.add_argument(
        "--min-threshold",
        type=arguments.percentage,
        metavar="T",
        help="its own minimum match threshold (never below the deployment's)",
    )
    threshold.add_argument(
        "--clear-min-threshold",
        action="store_true",
        help="drop its own minimum: the deployment's alone applies",
    )
    leaf(group, "list", _collections_list, "list the collections")
    get = leaf(group, "get", _collections_get, "describe a collection")
    get.add_argument("collection", metavar="ID", type=_collection_name)
    delete = leaf(group, "delete", _collections_delete, "delete a collection")
    delete.add_argument("collection", metavar="ID", type=_collection_name)
    delete.add_argument(
        "--force",
        action="store_true",
        help="also delete its faces and subjects, immediately and permanently",
    )


def _register_enrolment(commands: argparse._SubParsersAction[Any], leaf: Leaf) -> None:
    index = leaf(
        commands,
        "index",
        _index,
        "index faces from an image, a folder (person subfolders become subjects) or a "
        "seed manifest (.toml)",
    )
    index.add_argument(
        "path", type=Path, metavar="PATH", help="an image, a folder, or a manifest (.toml)"
    )
    index.add_argument(
        "--collection",
        type=_collection_name,
        metavar="ID",
        help="collection to index into (required, except for a manifest: its own)",
    )
    index.add_argument("--subject", default="", help="subject for every face (created if missing)")
    index.add_argument(
        "--max-faces",
        type=arguments.bounded_int(1, limits.MAX_FACES_PER_IMAGE),
        metavar="N",
        help="most faces per image (1 with a subject)",
    )
    index.add_argument("--quality", choices=QUALITY_CHOICES, help="quality filter (default auto)")
    index.add_argument("--source", default=None, help="source_id stored with each face")
    _min_face_size_option(index)
    _enrolment_options(index)

    seed = leaf(commands, "seed", _seed, "create and fill a collection from a seed manifest")
    seed.add_argument("manifest", type=Path, metavar="MANIFEST")
    _enrolment_options(seed)


def _enrolment_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        help="folder that a manifest's relative photo paths start from (overrides its root)",
    )
    parser.add_argument(
        "--jobs",
        type=arguments.bounded_int(1, 64),
        default=DEFAULT_JOBS,
        help=f"IndexFaces calls at a time (default {DEFAULT_JOBS})",
    )


def _register_identification(
    commands: argparse._SubParsersAction[Any], leaf: Leaf, identification: argparse.ArgumentParser
) -> None:
    detect = leaf(commands, "detect", _detect, "detect faces in an image (stores nothing)")
    detect.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    detect.add_argument(
        "--max-faces",
        type=arguments.bounded_int(1, limits.MAX_FACES_PER_IMAGE),
        default=0,
        metavar="N",
        help=f"default {limits.MAX_FACES_PER_IMAGE}",
    )
    detect.add_argument(
        "--min-confidence", type=arguments.percentage, metavar="C", help="0-100 (default 50)"
    )
    _min_face_size_option(detect)

    search = leaf(
        commands,
        "search",
        _search,
        "search a collection for the largest face of an image (audited)",
        identification,
    )
    search.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    search.add_argument("--collection", type=_collection_name, required=True, metavar="ID")
    _max_option(search, "most candidates (default 10; with --subjects at most 1,000)")
    _threshold_option(search)
    _quality_option(search, "quality the probe face must have (default auto)")
    search.add_argument("--subjects", action="store_true", help="rank subjects by their best face")

    search_face = leaf(
        commands,
        "search-face",
        _search_face,
        "search a collection for faces like one of its stored faces (audited)",
        identification,
    )
    search_face.add_argument("face", metavar="FACE_NAME", help="collections/{c}/faces/{f}")
    _max_option(search_face, "most candidates (default 10)")
    _threshold_option(search_face)

    compare = leaf(
        commands,
        "compare",
        _compare,
        "compare the largest face of SOURCE with the faces of TARGET (audited)",
        identification,
    )
    compare.add_argument("source", metavar="SOURCE", help="image whose largest face is compared")
    compare.add_argument("target", metavar="TARGET", help="image whose faces it is compared with")
    _threshold_option(compare)
    _quality_option(compare, "quality the faces must have (default auto)")


def _min_face_size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-face-size",
        type=arguments.bounded_int(limits.MIN_FACE_SIZE, 100_000),
        metavar="PX",
        help="smallest face to look for, in pixels: 40 or 20 enlarge the image 2 or 4 times "
        "(about 4 or 16 times the time; default 80, the detector's own)",
    )


def _max_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--max",
        type=arguments.bounded_int(1, 4096),
        default=10,
        dest="max_results",
        metavar="N",
        help=help_text,
    )


def _threshold_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=arguments.percentage,
        metavar="T",
        help="similarity 0-100; below the administrator's minimum it is raised to it",
    )


def _quality_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--quality", choices=QUALITY_CHOICES, default="auto", help=help_text)


def _register_faces_subjects(commands: argparse._SubParsersAction[Any], leaf: Leaf) -> None:
    faces = _group(commands, "faces", "list and delete stored faces")
    faces_list = leaf(faces, "list", _faces_list, "list the faces of a collection")
    faces_list.add_argument("--collection", type=_collection_name, required=True)
    faces_list.add_argument("--subject", default="", help="only this subject's faces")
    faces_list.add_argument("--limit", type=arguments.bounded_int(1, 10**9), default=None)
    faces_delete = leaf(faces, "delete", _faces_delete, "delete faces, immediately and permanently")
    faces_delete.add_argument(
        "names", nargs="+", metavar="NAME", help="collections/{c}/faces/{f}, or an id"
    )
    faces_delete.add_argument(
        "--collection", type=_collection_name, help="collection of names given as bare ids"
    )
    faces_delete.add_argument(
        "--allow-missing", action="store_true", help="skip faces that do not exist"
    )

    subjects = _group(commands, "subjects", "create, list and delete subjects (people)")
    create = leaf(subjects, "create", _subjects_create, "create a subject with no faces")
    create.add_argument("subject_id", metavar="ID")
    create.add_argument("--collection", type=_collection_name, required=True)
    create.add_argument("--display-name", default="")
    subjects_list = leaf(subjects, "list", _subjects_list, "list the subjects of a collection")
    subjects_list.add_argument("--collection", type=_collection_name, required=True)
    delete = leaf(subjects, "delete", _subjects_delete, "delete a subject")
    delete.add_argument("subject_id", metavar="ID")
    delete.add_argument("--collection", type=_collection_name, required=True)
    delete.add_argument(
        "--force", action="store_true", help="also delete its faces, immediately and permanently"
    )


def _register_audit(commands: argparse._SubParsersAction[Any], leaf: Leaf) -> None:
    audit = _group(commands, "audit", "read and verify the audit log")
    audit_list = leaf(audit, "list", _audit_list, "list audit records (the newest)")
    audit_list.add_argument("--case", default="", help="only records of this case id")
    audit_list.add_argument("--collection", type=_collection_name, help="only records of it")
    audit_list.add_argument(
        "--limit", type=arguments.bounded_int(1, 10**9), default=50, help="newest N (default 50)"
    )
    verify = leaf(audit, "verify", _audit_verify, "verify the audit log's hash chain")
    verify.add_argument(
        "--expect",
        action="append",
        default=[],
        type=_anchor,
        metavar="SEQ:SHA256",
        help="a record_hash kept elsewhere; the log must hold it (detects truncation)",
    )
    verify.add_argument(
        "--checkpoint",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a signed checkpoint (`facegrid audit checkpoint`); the log must hold its head",
    )
    verify.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="the gateway's public key (PEM, the .pub beside gateway.audit_signing_key_file), "
        "kept apart from the gateway; required with --checkpoint",
    )
    checkpoint = leaf(
        audit, "checkpoint", _audit_checkpoint, "export a signed checkpoint of the chain's head"
    )
    checkpoint.add_argument(
        "--out", type=Path, help="write the signed note here (default: standard output)"
    )
    setup = audit.add_parser(
        "setup-database",
        help="create the PostgreSQL audit table (as its owner) and a writer role's grants",
        description="Create the audit table, its indexes and its append-only triggers if "
        "missing, connected as the role that is to own them; with --writer-role, let that "
        "role (the one gateway.audit_database_url names) only read and append.",
    )
    setup.add_argument("url", help="postgresql:// URL of the owner")
    setup.add_argument("--writer-role", help="the services' role: SELECT and INSERT only")
    setup.set_defaults(handler=_audit_setup_database)
    migrate = audit.add_parser(
        "migrate",
        help="copy an SQLite audit log into an empty PostgreSQL one, keeping the chain",
        description="Copy every record of an SQLite audit log, verbatim (names, sequence "
        "numbers, hashes), into an empty PostgreSQL audit log, after verifying its chain. "
        "Stop the gateway and ingest first; start them after with "
        "gateway.audit_database_url set.",
    )
    migrate.add_argument("--from", dest="source", type=Path, required=True, help="SQLite file")
    migrate.add_argument("--to", dest="target", required=True, help="postgresql:// URL")
    migrate.set_defaults(handler=_audit_migrate)


# -- shared options ---------------------------------------------------------------------


def connection_options(
    flag: str = "--address", service: str = "gateway", setting: str = "gateway.port"
) -> argparse.ArgumentParser:
    """--address (or ``flag``) of ``service``, --token and --timeout."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection")
    group.add_argument(
        flag,
        metavar="ADDRESS",
        help=f"{service} host:port (default 127.0.0.1 and the {setting} setting)",
    )
    group.add_argument(
        "--token", help="bearer token (default $FACEGRID_TOKEN, else var/admin.token)"
    )
    group.add_argument(
        "--timeout",
        type=arguments.positive_float,
        default=DEFAULT_DEADLINE_S,
        help=f"deadline of each call, in seconds (default {DEFAULT_DEADLINE_S:.0f})",
    )
    return parser


def _identification_options() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("identification context (written to the audit log)")
    group.add_argument(
        "--purpose",
        required=True,
        choices=sorted(PURPOSES),
        metavar="PURPOSE",
        help=f"why the search is made: {', '.join(sorted(PURPOSES))}",
    )
    group.add_argument(
        "--case", required=True, type=_case_id, help="case, incident or task id (1-128 chars)"
    )
    group.add_argument(
        "--justification",
        default="",
        type=_justification,
        help="why it is needed, in your words (at most 2,000 characters)",
    )
    return parser


def _context(args: argparse.Namespace) -> common_pb2.IdentificationContext:
    return common_pb2.IdentificationContext(
        purpose=PURPOSES[args.purpose], case_id=args.case, justification=args.justification
    )


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Connect, run, and turn every expected failure into lines on stderr and exit 1."""

    def run(args: argparse.Namespace) -> int:
        errors = output.console(stderr=True)
        address = args.address or ""
        try:
            token = read_token(args.token)
            address = address or default_address()
            with FaceClient.connect(address, token, args.timeout) as client:
                return handler(args, client)
        except grpc.RpcError as error:
            print_rpc_error(errors, error, "gateway", address)
            return 1
        except (ClientError, ManifestError, PhotoError, OSError) as error:
            errors.print(f"error: {error}")
            return 1
        except KeyboardInterrupt:
            errors.print("interrupted")
            return 130

    return run


def print_rpc_error(errors: Console, error: Exception, service: str, address: str) -> None:
    """A failed call as a few lines on ``errors``; where to look if unreachable."""
    lines = describe_rpc_error(error)
    errors.print(f"error: {lines[0]}")
    for line in lines[1:]:
        errors.print(line)
    if status_code(error) == grpc.StatusCode.UNAVAILABLE:
        errors.print(f"  (is the {service} running at {address}?)")


# -- argument types ----------------------------------------------------------------------


_collection_id = arguments.resource_id(COLLECTION_ID_PATTERN, "collections/")


def _collection_name(value: str) -> str:
    """``demo`` or ``collections/demo`` -> ``collections/demo``."""
    return f"collections/{_collection_id(value)}"


def _case_id(value: str) -> str:
    if not 1 <= len(value) <= MAX_CASE_ID or not value.isprintable() or not value.strip():
        raise argparse.ArgumentTypeError(f"1 to {MAX_CASE_ID} printable characters")
    return value


def _justification(value: str) -> str:
    if len(value) > MAX_JUSTIFICATION:
        raise argparse.ArgumentTypeError(f"at most {MAX_JUSTIFICATION} characters")
    return value


def _anchor(value: str) -> tuple[int, bytes]:
    sequence, _, digest = value.partition(":")
    try:
        number, hashed = int(sequence), bytes.fromhex(digest)
    except ValueError:
        raise argparse.ArgumentTypeError("expected SEQ:SHA256 (hex)") from None
    if number < 1 or len(hashed) != 32:
        raise argparse.ArgumentTypeError("expected SEQ:SHA256 (a 64-digit hex digest)")
    return number, hashed


def _read_image(reference: str) -> bytes:
    """An image file, or a ``package:`` resource, as bytes."""
    return resolve_photo(reference, Path.cwd()).read_bytes()


# -- collections -------------------------------------------------------------------------


def _collections_create(args: argparse.Namespace, client: FaceClient) -> int:
    collection = resources_pb2.Collection(
        display_name=args.display_name, description=args.description
    )
    if args.min_threshold is not None:
        collection.min_match_threshold = args.min_threshold
    reply = client.create_collection(
        fs.CreateCollectionRequest(collection_id=args.collection_id, collection=collection)
    )
    output.collection_details(output.console(), reply.collection)
    return 0


def _collections_update(args: argparse.Namespace, client: FaceClient) -> int:
    collection = resources_pb2.Collection(name=args.collection)
    paths = []
    for option, path in (("display_name", "display_name"), ("description", "description")):
        value = getattr(args, option)
        if value is not None:
            setattr(collection, path, value)
            paths.append(path)
    if args.min_threshold is not None:
        collection.min_match_threshold = args.min_threshold
        paths.append("min_match_threshold")
    if args.clear_min_threshold:
        paths.append("min_match_threshold")
    if not paths:
        raise ClientError(
            "nothing to change: give --display-name, --description, --min-threshold or "
            "--clear-min-threshold"
        )
    reply = client.update_collection(
        fs.UpdateCollectionRequest(
            collection=collection, update_mask=field_mask_pb2.FieldMask(paths=paths)
        )
    )
    output.collection_details(output.console(), reply.collection)
    return 0


def _collections_list(args: argparse.Namespace, client: FaceClient) -> int:
    def page(token: str) -> tuple[list[Any], str]:
        reply = client.list_collections(
            fs.ListCollectionsRequest(page_size=PAGE_SIZE, page_token=token)
        )
        return list(reply.collections), reply.next_page_token

    output.collections_table(output.console(), list(_all_pages(page)))
    return 0


def _collections_get(args: argparse.Namespace, client: FaceClient) -> int:
    reply = client.get_collection(fs.GetCollectionRequest(name=args.collection))
    output.collection_details(output.console(), reply.collection)
    return 0


def _collections_delete(args: argparse.Namespace, client: FaceClient) -> int:
    reply = client.delete_collection(
        fs.DeleteCollectionRequest(name=args.collection, force=args.force)
    )
    output.console().print(
        f"deleted {args.collection} and {output.plural(reply.deleted_face_count, 'face')} with it"
    )
    return 0


# -- enrolment ---------------------------------------------------------------------------


def _index(args: argparse.Namespace, client: FaceClient) -> int:
    path: Path = args.path
    if path.suffix.lower() == ".toml":
        if args.subject:
            raise ClientError("--subject cannot be used with a manifest (it names subjects)")
        manifest = load_manifest(path, args.root)
        manifest = replace(manifest, photos=tuple(_override(p, args) for p in manifest.photos))
        collection_id = args.collection.removeprefix("collections/") if args.collection else None
        return _enrol_manifest(manifest, client, args.jobs, collection_id)
    if args.collection is None:
        raise ClientError("--collection is required (except for a manifest)")
    if args.subject and not SUBJECT_ID_PATTERN.fullmatch(args.subject):
        raise ClientError(f"--subject {args.subject!r}: 1 to 128 of [a-zA-Z0-9_.-:]")
    if path.is_dir():
        plan = plan_folder(path, args.subject)
        subjects, photos, skipped = plan.subjects, plan.photos, plan.skipped
    elif path.is_file():
        subjects = [SubjectSpec(args.subject)] if args.subject else []
        photos = [
            PhotoSpec(
                path=str(path),
                entry=str(path),
                subject_id=args.subject,
                external_image_id=safe_external_id(path.name),
            )
        ]
        skipped = []
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    photos = [_override(photo, args) for photo in photos]
    try:
        collection = client.get_collection(fs.GetCollectionRequest(name=args.collection))
    except grpc.RpcError as error:
        if status_code(error) == grpc.StatusCode.NOT_FOUND:
            collection_id = args.collection.removeprefix("collections/")
            raise ClientError(
                f"{args.collection} does not exist; create it with "
                f"`facegrid collections create {collection_id}`"
            ) from None
        raise
    with _Progress(len(photos)) as advance:
        summary = enrol(
            client,
            collection.collection,
            subjects,
            photos,
            Path.cwd(),
            jobs=args.jobs,
            on_progress=advance,
        )
    summary.skipped.extend(skipped)
    output.index_summary(output.console(), summary)
    return 0 if summary.ok else 1


def _seed(args: argparse.Namespace, client: FaceClient) -> int:
    return _enrol_manifest(load_manifest(args.manifest, args.root), client, args.jobs, None)


def _enrol_manifest(
    manifest: Manifest, client: FaceClient, jobs: int, collection_id: str | None
) -> int:
    with _Progress(len(manifest.photos)) as advance:
        summary = seed_with_client(
            manifest, client, collection_id=collection_id, jobs=jobs, on_progress=advance
        )
    output.index_summary(output.console(), summary)
    return 0 if summary.ok else 1


def _override(photo: PhotoSpec, args: argparse.Namespace) -> PhotoSpec:
    """Apply --max-faces, --quality and --source where given."""
    if args.max_faces is not None:
        if photo.subject_id and args.max_faces > 1:
            raise ClientError(
                f"--max-faces {args.max_faces}: a photo of a subject ({photo.subject_id}) "
                "is indexed with its largest face only"
            )
        photo = replace(photo, max_faces=0 if photo.subject_id else args.max_faces)
    if args.quality is not None:
        photo = replace(photo, quality=args.quality)
    if args.source is not None:
        photo = replace(photo, source_id=args.source)
    if getattr(args, "min_face_size", None) is not None:
        photo = replace(photo, min_face_size=args.min_face_size)
    return photo


class _Progress:
    """A progress bar on stderr while photos are indexed (none when not a terminal)."""

    def __init__(self, total: int) -> None:
        console = output.console(stderr=True)
        self._bar = Progress(
            TextColumn("indexing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=console,
            disable=not console.is_terminal,
            transient=False,
        )
        self._task = self._bar.add_task("", total=total)

    def __enter__(self) -> Callable[[PhotoResult], None]:
        self._bar.start()

        def advance(result: PhotoResult) -> None:
            self._bar.update(self._task, advance=1, description=Path(result.reference).name)

        return advance

    def __exit__(self, *exc_info: object) -> None:
        self._bar.update(self._task, description="")
        self._bar.stop()


# -- detection and identification -------------------------------------------------------


def _detect(args: argparse.Namespace, client: FaceClient) -> int:
    request = fs.DetectFacesRequest(image=_read_image(args.image), max_faces=args.max_faces)
    if args.min_confidence is not None:
        request.min_confidence = args.min_confidence
    if args.min_face_size is not None:
        request.min_face_size = args.min_face_size
    output.detect_table(output.console(), client.detect_faces(request), args.image)
    return 0


def _search(args: argparse.Namespace, client: FaceClient) -> int:
    image = _read_image(args.image)
    quality = QUALITY_FILTERS[args.quality]
    out = output.console()
    if args.subjects:
        subjects_request = fs.SearchSubjectsByImageRequest(
            parent=args.collection,
            image=image,
            max_subjects=min(args.max_results, 1000),
            quality_filter=quality,
            context=_context(args),
        )
        if args.threshold is not None:
            subjects_request.subject_match_threshold = args.threshold
        reply = client.search_subjects_by_image(subjects_request)
        output.subjects_search(out, reply, args.image)
        return 0
    request = fs.SearchFacesByImageRequest(
        parent=args.collection,
        image=image,
        max_faces=args.max_results,
        quality_filter=quality,
        context=_context(args),
    )
    if args.threshold is not None:
        request.face_match_threshold = args.threshold
    output.search_by_image(out, client.search_faces_by_image(request), args.image)
    return 0


def _search_face(args: argparse.Namespace, client: FaceClient) -> int:
    request = fs.SearchFacesRequest(
        face=args.face, max_faces=args.max_results, context=_context(args)
    )
    if args.threshold is not None:
        request.face_match_threshold = args.threshold
    output.search_by_face(output.console(), client.search_faces(request))
    return 0


def _compare(args: argparse.Namespace, client: FaceClient) -> int:
    request = fs.CompareFacesRequest(
        source_image=_read_image(args.source),
        target_image=_read_image(args.target),
        quality_filter=QUALITY_FILTERS[args.quality],
        context=_context(args),
    )
    if args.threshold is not None:
        request.similarity_threshold = args.threshold
    output.compare(output.console(), client.compare_faces(request), args.source, args.target)
    return 0


# -- faces and subjects -----------------------------------------------------------------


def _faces_list(args: argparse.Namespace, client: FaceClient) -> int:
    face_filter = resources_pb2.FaceFilter(subject_ids=[args.subject] if args.subject else [])

    def page(token: str) -> tuple[list[Any], str]:
        reply = client.list_faces(
            fs.ListFacesRequest(
                parent=args.collection, page_size=PAGE_SIZE, page_token=token, filter=face_filter
            )
        )
        return list(reply.faces), reply.next_page_token

    faces = _all_pages(page)
    if args.limit is not None:
        faces = _take(faces, args.limit)
    count = output.faces_table(output.console(), faces)
    output.console().print(output.plural(count, "face"))
    return 0


def _faces_delete(args: argparse.Namespace, client: FaceClient) -> int:
    names = []
    for name in args.names:
        if "/" not in name:
            if not args.collection:
                raise ClientError(f"{name}: give full face names, or --collection for bare ids")
            name = f"{args.collection}/faces/{name}"
        names.append(name)
    parents = {name.partition("/faces/")[0] for name in names}
    if len(parents) != 1 or not all("/faces/" in name for name in names):
        raise ClientError(
            "every name must be collections/{collection}/faces/{face}, all in one collection"
        )
    if len(names) > MAX_DELETE_NAMES:
        raise ClientError(f"at most {MAX_DELETE_NAMES} faces per call (deletion is atomic)")
    reply = client.batch_delete_faces(
        fs.BatchDeleteFacesRequest(
            parent=parents.pop(), names=names, allow_missing=args.allow_missing
        )
    )
    out = output.console()
    for name in reply.deleted_faces:
        out.print(f"deleted {name}")
    missing = len(names) - len(reply.deleted_faces)
    out.print(
        f"{output.plural(len(reply.deleted_faces), 'face')} deleted"
        + (f", {missing} did not exist" if missing else "")
    )
    return 0


def _subjects_create(args: argparse.Namespace, client: FaceClient) -> int:
    reply = client.create_subject(
        fs.CreateSubjectRequest(
            parent=args.collection,
            subject_id=args.subject_id,
            subject={"display_name": args.display_name},
        )
    )
    output.console().print(f"created {reply.subject.name}")
    return 0


def _subjects_list(args: argparse.Namespace, client: FaceClient) -> int:
    def page(token: str) -> tuple[list[Any], str]:
        reply = client.list_subjects(
            fs.ListSubjectsRequest(parent=args.collection, page_size=PAGE_SIZE, page_token=token)
        )
        return list(reply.subjects), reply.next_page_token

    count = output.subjects_table(output.console(), _all_pages(page))
    output.console().print(output.plural(count, "subject"))
    return 0


def _subjects_delete(args: argparse.Namespace, client: FaceClient) -> int:
    name = f"{args.collection}/subjects/{args.subject_id}"
    reply = client.delete_subject(fs.DeleteSubjectRequest(name=name, force=args.force))
    output.console().print(
        f"deleted {name} and {output.plural(reply.deleted_face_count, 'face')} with it"
    )
    return 0


# -- audit ---------------------------------------------------------------------------------


def _audit_records(
    client: FaceClient, audit_filter: fs.AuditRecordFilter | None = None
) -> Iterator[fs.AuditRecord]:
    def page(token: str) -> tuple[list[Any], str]:
        reply = client.list_audit_records(
            fs.ListAuditRecordsRequest(page_size=PAGE_SIZE, page_token=token, filter=audit_filter)
        )
        return list(reply.audit_records), reply.next_page_token

    return _all_pages(page)


def _audit_list(args: argparse.Namespace, client: FaceClient) -> int:
    audit_filter = fs.AuditRecordFilter(case_id=args.case, collection=args.collection or "")
    newest = deque(_audit_records(client, audit_filter), maxlen=args.limit)
    output.audit_table(output.console(), list(newest))
    return 0


def _audit_verify(args: argparse.Namespace, client: FaceClient) -> int:
    anchors = dict(args.expect)
    if args.checkpoint:
        if args.public_key is None:
            raise SystemExit("--checkpoint needs --public-key FILE")
        key = audit_checkpoint.load_public_key(args.public_key.read_bytes())
        for path in args.checkpoint:
            try:
                checkpoint = audit_checkpoint.verify(path.read_text(), key)
            except audit_checkpoint.CheckpointError as error:
                output.console(stderr=True).print(f"{path}: {error}")
                return 1
            if checkpoint.sequence_number:
                anchors[checkpoint.sequence_number] = checkpoint.record_hash
    report = verify_chain(_audit_records(client), anchors=anchors)
    out = output.console()
    if report.first_break is not None:
        output.console(stderr=True).print(f"audit log BROKEN at {report.first_break}")
        out.print(f"{report.records} records verified before the break")
        return 1
    if report.records == 0:
        out.print("audit log is empty")
        return 0
    out.print(
        f"audit log intact: {report.records} records, {report.first_sequence} to "
        f"{report.last_sequence}"
    )
    out.print(f"newest record_hash: {report.last_sequence}:{report.last_hash.hex()}")
    out.print(
        "Keep this line elsewhere; `facegrid audit verify --expect` with it later shows "
        "whether the newest records were removed."
    )
    return 0


def _audit_checkpoint(args: argparse.Namespace, client: FaceClient) -> int:
    reply = client.get_audit_checkpoint()
    if args.out is None:
        sys.stdout.write(reply.signed_note)
    else:
        args.out.write_text(reply.signed_note)
        output.console().print(
            f"checkpoint of record {reply.sequence_number} written to {args.out}; check it "
            "later with `facegrid audit verify --checkpoint FILE --public-key FILE`"
        )
    return 0


def _audit_setup_database(args: argparse.Namespace) -> int:
    from facegrid.audit_postgres import connect, create_schema, grant_writer

    with connect(args.url) as connection:
        create_schema(connection)
        if args.writer_role:
            grant_writer(connection, args.writer_role)
    granted = f"; {args.writer_role} may only read and append" if args.writer_role else ""
    output.console().print(f"audit table ready{granted}")
    return 0


def _audit_migrate(args: argparse.Namespace) -> int:
    from facegrid.audit_log import SqliteAuditLog
    from facegrid.audit_postgres import AuditMigrationError, migrate

    if not args.source.is_file():
        raise SystemExit(f"{args.source}: no such file")
    source = SqliteAuditLog(args.source)
    try:
        copied = migrate(source.rows(), args.target)
    except AuditMigrationError as error:
        output.console(stderr=True).print(f"not migrated: {error}")
        return 1
    finally:
        source.close()
    output.console().print(f"migrated {copied} audit records, chain intact")
    return 0


# -- helpers ----------------------------------------------------------------------------------


def _all_pages(fetch: Callable[[str], tuple[list[Any], str]]) -> Iterator[Any]:
    token = ""
    while True:
        items, token = fetch(token)
        yield from items
        if not token:
            return


def _take(items: Iterator[Any], limit: int) -> Iterator[Any]:
    for count, item in enumerate(items):
        if count >= limit:
            return
        yield item
