"""Collections and subjects: browse, add a subject, enrol a photo (with its quality
report), delete.

Enrolment is IndexFaces; its result page reports every face found, indexed or not, with
the quality the gateway measured and why a face was left out. Deletion is
BatchDeleteFaces or DeleteSubject after a confirmation page that says what will be gone
(the faces' embeddings, for good); the POST repeats the name, so a forged or stale
link deletes nothing.
"""

from __future__ import annotations

import uuid
from typing import Any

from facegrid.v1 import face_service_pb2, resources_pb2
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from facegrid_console import views
from facegrid_console.web import Console, Signed, checked_form, signed_in, text, upload

F = face_service_pb2

PAGE_SIZE = 50


def _collection_id(request: Request) -> str:
    value = str(request.path_params["collection"])
    if "/" in value or not value:
        raise HTTPException(400, "Not a collection id.")
    return value


def routes(console: Console) -> list[BaseRoute]:
    faces = console.backend.face

    async def collections(request: Request, signed: Signed) -> Response:
        reply = await faces(
            "ListCollections",
            F.ListCollectionsRequest(
                page_size=PAGE_SIZE, page_token=request.query_params.get("page_token", "")
            ),
            signed.token,
        )
        return console.render(request, "collections.html", {"reply": reply}, signed=signed)

    async def collection(request: Request, signed: Signed) -> Response:
        collection_id = _collection_id(request)
        parent = f"collections/{collection_id}"
        got = await faces("GetCollection", F.GetCollectionRequest(name=parent), signed.token)
        subjects = await faces(
            "ListSubjects",
            F.ListSubjectsRequest(
                parent=parent,
                page_size=PAGE_SIZE,
                page_token=request.query_params.get("subjects_page", ""),
            ),
            signed.token,
        )
        listed = await faces(
            "ListFaces",
            F.ListFacesRequest(
                parent=parent,
                page_size=PAGE_SIZE,
                page_token=request.query_params.get("faces_page", ""),
            ),
            signed.token,
        )
        return console.render(
            request,
            "collection.html",
            {
                "collection": got.collection,
                "collection_id": collection_id,
                "subjects": subjects,
                "faces": listed,
                "request_id": str(uuid.uuid4()),
            },
            signed=signed,
        )

    async def enrol(request: Request, signed: Signed) -> Response:
        collection_id = _collection_id(request)
        form = await checked_form(console, request, signed)
        photo = await upload(form, "photo")
        reply = await faces(
            "IndexFaces",
            F.IndexFacesRequest(
                parent=f"collections/{collection_id}",
                image=photo,
                subject_id=text(form, "subject_id"),
                external_image_id=text(form, "external_image_id"),
                max_faces=1 if text(form, "largest_only") else 0,
                request_id=text(form, "request_id") or str(uuid.uuid4()),
            ),
            signed.token,
        )
        return console.render(
            request,
            "enrolled.html",
            {
                "collection_id": collection_id,
                "reply": reply,
                "indexed": [_face_report(r.face_detail, r.face.name) for r in reply.face_records],
                "left_out": [
                    _face_report(
                        u.face_detail,
                        "",
                        [
                            views.enum_label(F.UnindexedReason.Name(r), "UNINDEXED_REASON_")
                            for r in u.reasons
                        ],
                    )
                    for u in reply.unindexed_faces
                ],
            },
            signed=signed,
        )

    async def create_subject(request: Request, signed: Signed) -> Response:
        collection_id = _collection_id(request)
        form = await checked_form(console, request, signed)
        await faces(
            "CreateSubject",
            F.CreateSubjectRequest(
                parent=f"collections/{collection_id}",
                subject_id=text(form, "subject_id"),
                subject=resources_pb2.Subject(display_name=text(form, "display_name")),
            ),
            signed.token,
        )
        return RedirectResponse(f"/collections/{collection_id}?created=subject", status_code=303)

    async def confirm_delete(request: Request, signed: Signed) -> Response:
        collection_id = _collection_id(request)
        kind = request.path_params["kind"]
        item = str(request.path_params["item"])
        if kind not in ("faces", "subjects") or "/" in item:
            raise HTTPException(404, "Nothing to delete here.")
        name = f"collections/{collection_id}/{kind}/{item}"
        if kind == "faces":
            shown = (await faces("GetFace", F.GetFaceRequest(name=name), signed.token)).face
        else:
            shown = (
                await faces("GetSubject", F.GetSubjectRequest(name=name), signed.token)
            ).subject
        return console.render(
            request,
            "confirm_delete.html",
            {"collection_id": collection_id, "kind": kind, "name": name, "item": shown},
            signed=signed,
        )

    async def delete(request: Request, signed: Signed) -> Response:
        collection_id = _collection_id(request)
        kind = request.path_params["kind"]
        item = str(request.path_params["item"])
        form = await checked_form(console, request, signed)
        name = f"collections/{collection_id}/{kind}/{item}"
        if text(form, "confirm_name") != name:
            raise HTTPException(400, f"Type {name} to confirm the deletion.")
        if kind == "faces":
            await faces(
                "BatchDeleteFaces",
                F.BatchDeleteFacesRequest(parent=f"collections/{collection_id}", names=[name]),
                signed.token,
            )
        elif kind == "subjects":
            await faces(
                "DeleteSubject",
                F.DeleteSubjectRequest(name=name, force=bool(text(form, "force"))),
                signed.token,
            )
        else:
            raise HTTPException(404, "Nothing to delete here.")
        return RedirectResponse(f"/collections/{collection_id}?deleted={kind}", status_code=303)

    return [
        Route("/collections", signed_in(console, collections), methods=["GET"]),
        Route("/collections/{collection}", signed_in(console, collection), methods=["GET"]),
        Route("/collections/{collection}/faces", signed_in(console, enrol), methods=["POST"]),
        Route(
            "/collections/{collection}/subjects",
            signed_in(console, create_subject),
            methods=["POST"],
        ),
        Route(
            "/collections/{collection}/{kind}/{item}/delete",
            signed_in(console, confirm_delete),
            methods=["GET"],
        ),
        Route(
            "/collections/{collection}/{kind}/{item}/delete",
            signed_in(console, delete),
            methods=["POST"],
        ),
    ]


def _face_report(detail: Any, name: str, reasons: list[str] | None = None) -> dict[str, Any]:
    quality = detail.quality
    return {
        "name": name,
        "box": detail.bounding_box,
        "confidence": detail.confidence,
        "sharpness": quality.sharpness,
        "brightness": quality.brightness,
        "face_size": quality.face_size,
        "inter_eye_distance": quality.inter_eye_distance,
        "yaw": quality.yaw if quality.HasField("yaw") else None,
        "pitch": quality.pitch if quality.HasField("pitch") else None,
        "reasons": reasons or [],
    }
