"""/recognition/v2/training-image: upload, label, filter, download and delete training images."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Query, Request, Response
from sqlalchemy import ColumnElement, exists, select
from sqlalchemy.orm import Session, selectinload
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.auth import authenticate
from api.db.models import ImageLabel, Label, TaskLabel, TrainingImage, User
from api.deps import (
    BlobsDep,
    BodyDep,
    CurrentUser,
    FetchSlotsDep,
    ImageIdPath,
    SessionDep,
    SettingsDep,
    UrlSignerDep,
    body_of,
    check_body_workspace,
)
from api.http.body import is_form, parse, parse_json
from api.http.openapi import COMMON, errors, request_body
from api.http.pagination import PageDep, paginate
from api.http.query import strict_float
from api.http.routing import SlashAgnosticRouter
from api.presenters import image_public
from api.schemas.common import ID_PATTERN, INT32_MAX, NO_NUL, Page
from api.schemas.images import (
    BulkImageUpdate,
    BulkImageUpdated,
    ImageCreate,
    ImageLabelBody,
    ImageMetaUpdate,
    ImagePublic,
    ImageUpload,
)
from api.services.blob_gc import schedule as schedule_blob_deletion
from api.services.ingest import prepare_image, store_image
from api.services.lookups import get_image, get_label, get_task
from api.services.signing import UrlSigner
from api.services.url_fetch import fetch_image
from api.settings import Settings
from taskvision.errors import AuthenticationError, BadRequestError, NotFoundError, PayloadTooLargeError
from taskvision.imaging import decode_base64
from taskvision.storage import BlobStore
from taskvision.task_types import LabelType

router = SlashAgnosticRouter(
    prefix="/recognition/v2/training-image", tags=["training images"], responses=errors(*COMMON)
)

_VALUE_FILTER = re.compile(r"^label_value_(?P<label>[^_].*?)__(?P<op>gte|lte)$")
# At most this many ids in one filter (each becomes a SQL parameter).
MAX_IDS = 1000

ImageLabelBodyDep = Annotated[ImageLabelBody, body_of(ImageLabelBody, form=True)]
ImageMetaBody = Annotated[ImageMetaUpdate, body_of(ImageMetaUpdate, required=False)]
BulkBody = Annotated[BulkImageUpdate, body_of(BulkImageUpdate)]
IdList = Annotated[
    str | None,
    Query(
        pattern="^[A-Za-z0-9._~,-]*$", description="Label ids, separated by commas (or repeat the parameter)."
    ),
]


def _ids(request: Request, *names: str) -> list[str]:
    """The ids of these query parameters, repeated or comma-separated."""
    ids = [
        part.strip()
        for name in names
        for raw in request.query_params.getlist(name)
        for part in raw.split(",")
        if part.strip()
    ]
    if len(ids) > MAX_IDS:
        raise BadRequestError(
            f"At most {MAX_IDS} ids in a filter; this one has {len(ids)}.", code="invalid_filter"
        )
    return ids


def _has_label(*conditions: ColumnElement[bool]) -> ColumnElement[bool]:
    return exists().where(ImageLabel.image_id == TrainingImage.id, *conditions)


@router.get("/", response_model=Page[ImagePublic])
def list_images(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    labels: IdList = None,
    label: IdList = None,
    not_labels: IdList = None,
    task: Annotated[
        str | None, Query(pattern=ID_PATTERN, description="Images with a label of this task.")
    ] = None,
    test: Annotated[bool | None, Query(description="Only test (true) or training (false) images.")] = None,
    real: bool | None = None,
    verified: Annotated[int | None, Query(ge=0, le=INT32_MAX, description="Times verified, exactly.")] = None,
) -> Any:
    """Images of the workspace, oldest first.

    Filters: ``labels`` (any of these label ids; also ``label``), ``not_labels`` (none of
    them), ``task``, ``test``, ``real``, ``verified``, and for a value label
    ``label_value_<label id>__gte`` / ``__lte`` (bounds on the image's value).
    """
    stmt = (
        select(TrainingImage)
        .options(selectinload(TrainingImage.label_links))
        .where(TrainingImage.workspace_id == user.workspace_id)
    )
    if wanted := _ids(request, "labels", "label"):
        stmt = stmt.where(_has_label(ImageLabel.label_id.in_(wanted)))
    if unwanted := _ids(request, "not_labels"):
        stmt = stmt.where(~_has_label(ImageLabel.label_id.in_(unwanted)))
    if task:
        task_labels = select(TaskLabel.label_id).where(TaskLabel.task_id == get_task(session, user, task).id)
        stmt = stmt.where(_has_label(ImageLabel.label_id.in_(task_labels)))
    for key, raw in request.query_params.multi_items():
        match = _VALUE_FILTER.match(key)
        if match:
            bound = strict_float(raw, name=key, code="invalid_filter")
            column_test = ImageLabel.value >= bound if match["op"] == "gte" else ImageLabel.value <= bound
            stmt = stmt.where(_has_label(ImageLabel.label_id == match["label"], column_test))
    if test is not None:
        stmt = stmt.where(TrainingImage.test_image.is_(test))
    if real is not None:
        stmt = stmt.where(TrainingImage.real.is_(real))
    if verified is not None:
        stmt = stmt.where(TrainingImage.verify_count == verified)
    stmt = stmt.order_by(TrainingImage.created, TrainingImage.id)
    return paginate(
        session,
        stmt,
        request=request,
        page=page,
        serialize=lambda rows: [image_public(i, request) for i in rows],
    )


def _upload_source(body: dict[str, Any], data: ImageCreate) -> str:
    """Which one of the three ways to send an image this request uses."""
    sources = [
        name
        for name, present in (
            ("img_path", isinstance(body.get("img_path"), UploadFile)),
            ("base64", bool(data.base64)),
            ("url", bool(data.url)),
        )
        if present
    ]
    if not sources:
        raise BadRequestError(
            "Send the image as a multipart file 'img_path', as JSON 'base64', or as JSON 'url'.",
            code="no_image",
        )
    if len(sources) > 1:
        raise BadRequestError(f"Send exactly one image source, not {', '.join(sources)}.", code="no_image")
    return sources[0]


def _local_bytes(body: dict[str, Any], data: ImageCreate, settings: Settings) -> bytes:
    upload = body.get("img_path")
    if isinstance(upload, UploadFile):
        if upload.size is not None and upload.size > settings.max_upload_bytes:
            raise PayloadTooLargeError(
                f"The image is {upload.size} bytes; at most {settings.max_upload_bytes} bytes are accepted."
            )
        return upload.file.read(settings.max_upload_bytes + 1)
    return decode_base64(data.base64 or "")


@router.post(
    "/",
    status_code=201,
    response_model=ImagePublic,
    openapi_extra=request_body(ImageCreate, form=ImageUpload),
)
async def create_image(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    body: BodyDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    fetch_slots: FetchSlotsDep,
) -> Any:
    """Upload one training image: JSON ``base64`` or ``url``, or a multipart file ``img_path``.

    A re-upload of an identical image answers 400 with ``"... image ID: <id>"``. Asynchronous
    so that fetching a ``url`` holds no worker thread and no database connection (the session
    is closed first); decoding and storing run in the thread pool.
    """
    check_body_workspace(user, body)
    if isinstance(body.get("meta_data"), str):  # form fields carry JSON as text
        text = body["meta_data"]
        try:
            meta = parse_json(text) if text.strip() else {}
        except BadRequestError as exc:
            raise BadRequestError(f"'meta_data': {exc.detail}", code="invalid_meta_data") from exc
        if not isinstance(meta, dict | None):
            raise BadRequestError("'meta_data' must be a JSON object.", code="invalid_meta_data")
        body["meta_data"] = meta
    data = parse(ImageCreate, body, form=is_form(request))
    if _upload_source(body, data) == "url":
        await run_in_threadpool(session.close)
        raw = await fetch_image(
            str(data.url), settings.fetch_policy(), fetch_slots, workspace=user.workspace_id
        )
    else:
        raw = await run_in_threadpool(_local_bytes, body, data, settings)

    def store() -> Any:
        prepared = prepare_image(raw, noresize=data.noresize, settings=settings)
        image = store_image(
            session,
            blobs,
            user,
            prepared,
            test_image=data.test_image,
            real=data.real,
            meta_data=data.meta_data,
        )
        return image_public(get_image(session, user, image.id), request)

    return await run_in_threadpool(store)


@router.post("/update", response_model=BulkImageUpdated)
def bulk_update(session: SessionDep, user: CurrentUser, data: BulkBody) -> Any:
    """Change many images at once: select by ``images`` and/or ``labels``, then add/remove labels
    and set or clear the test and real flags."""
    if not data.images and not data.labels:
        raise BadRequestError(
            "Select images by 'images' (ids) and/or 'labels' (label ids).", code="no_selection"
        )
    if (data.mark_test and data.unmark_test) or (data.mark_real and data.unmark_real):
        raise BadRequestError(
            "mark and unmark of the same flag contradict each other.", code="conflicting_flags"
        )
    add = [get_label(session, user, lid, referenced=True) for lid in data.labels_add]
    remove = [get_label(session, user, lid, referenced=True) for lid in data.labels_remove]
    for label in add:
        if label.type == LabelType.VALUE:
            raise BadRequestError(
                f"Label '{label.name}' is a value label; set values with add-label and a 'value'.",
                code="value_required",
            )
    stmt = select(TrainingImage).where(TrainingImage.workspace_id == user.workspace_id)
    if data.images:
        stmt = stmt.where(TrainingImage.id.in_(data.images))
    if data.labels:
        stmt = stmt.where(_has_label(ImageLabel.label_id.in_(data.labels)))
    images = session.scalars(stmt.options(selectinload(TrainingImage.label_links))).all()
    if data.images and not data.labels:
        missing = set(data.images) - {image.id for image in images}
        if missing:
            raise NotFoundError(f"Training image {sorted(missing)[0]} not found.")
    remove_ids = {label.id for label in remove}
    for image in images:
        present = {link.label_id for link in image.label_links}
        for label in add:
            if label.id not in present:
                image.label_links.append(ImageLabel(label_id=label.id))
        image.label_links[:] = [link for link in image.label_links if link.label_id not in remove_ids]
        if data.mark_test or data.unmark_test:
            image.test_image = data.mark_test
        if data.mark_real or data.unmark_real:
            image.real = data.mark_real
    session.commit()
    return {"updated": len(images), "images": [image.id for image in images]}


@router.get("/{image_id}", response_model=ImagePublic)
def get_image_detail(image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser) -> Any:
    return image_public(get_image(session, user, image_id), request)


def _update(image_id: str, request: Request, session: Session, user: User, data: ImageMetaUpdate) -> Any:
    image = get_image(session, user, image_id)
    if data.meta_data is not None:
        image.meta_data = data.meta_data  # replaced, as ximilar-client merges on its side
    if data.test_image is not None:
        image.test_image = data.test_image
    if data.real is not None:
        image.real = data.real
    session.commit()
    return image_public(get_image(session, user, image_id), request)


@router.put("/{image_id}", response_model=ImagePublic)
def put_image(
    image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser, data: ImageMetaBody
) -> Any:
    """Replace the image's meta data, or set its test / real flags."""
    return _update(image_id, request, session, user, data)


@router.patch("/{image_id}", response_model=ImagePublic)
def patch_image(
    image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser, data: ImageMetaBody
) -> Any:
    return _update(image_id, request, session, user, data)


@router.delete("/{image_id}", status_code=204, response_class=Response)
def delete_image(image_id: ImageIdPath, session: SessionDep, user: CurrentUser) -> Response:
    """Delete the image; its files go later, once nothing needs them (api/services/blob_gc.py)."""
    image = get_image(session, user, image_id)
    schedule_blob_deletion(session, image.workspace_id, image.sha256)
    session.delete(image)
    session.commit()
    return Response(status_code=204)


def _download(
    request: Request,
    session: Session,
    blobs: BlobStore,
    signer: UrlSigner,
    image_id: str,
    kind: str,
    expires: str | None,
    signature: str | None,
) -> Response:
    """Serve an image to its owner's token, or to anyone holding an unexpired signed link."""
    if expires and signature and "authorization" not in request.headers:
        if not signer.verify_text(image_id, kind, expires, signature):
            raise AuthenticationError("The download link is invalid or has expired; list the image again.")
        image = session.scalar(select(TrainingImage).where(TrainingImage.id == image_id))
        if image is None:
            raise NotFoundError(f"Training image {image_id} not found.")
    else:
        user = authenticate(session, request.headers.get("authorization"))
        image = get_image(session, user, image_id)
    thumb = kind == "thumb"
    return Response(
        content=blobs.get(image.thumb_key if thumb else image.blob_key),
        media_type="image/jpeg" if thumb else image.content_type,
        headers={
            "Cache-Control": "private, max-age=3600",
            "ETag": f'"{image.sha256}{"-t" if thumb else ""}"',
        },
    )


Expires = Annotated[
    str | None, Query(pattern="^[0-9]{1,12}$", description="Signed links: when the link expires (Unix time).")
]
Signature = Annotated[
    str | None, Query(max_length=128, pattern=NO_NUL, description="Signed links: the signature.")
]
_IMAGE_FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
        "description": "The image.",
    }
}


@router.get(
    "/{image_id}/file", response_class=Response, responses={**_IMAGE_FILE, **errors(401, 404, 422, 429)}
)
def download_image(
    image_id: ImageIdPath,
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    signer: UrlSignerDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Response:
    """The stored image bytes: with the API token, or through the signed ``img_path`` link."""
    return _download(request, session, blobs, signer, image_id, "file", expires, signature)


@router.get("/{image_id}/file/{filename}", response_class=Response, include_in_schema=False)
def download_image_named(
    image_id: ImageIdPath,
    filename: str,
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    signer: UrlSignerDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Response:
    """The same, with the file name last (ximilar-client names its download after it)."""
    return _download(request, session, blobs, signer, image_id, "file", expires, signature)


@router.get(
    "/{image_id}/thumb", response_class=Response, responses={**_IMAGE_FILE, **errors(401, 404, 422, 429)}
)
def download_thumbnail(
    image_id: ImageIdPath,
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    signer: UrlSignerDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Response:
    """The JPEG thumbnail: with the API token, or through the signed ``thumb_img_path`` link."""
    return _download(request, session, blobs, signer, image_id, "thumb", expires, signature)


@router.get("/{image_id}/thumb/{filename}", response_class=Response, include_in_schema=False)
def download_thumbnail_named(
    image_id: ImageIdPath,
    filename: str,
    request: Request,
    session: SessionDep,
    blobs: BlobsDep,
    signer: UrlSignerDep,
    expires: Expires = None,
    signature: Signature = None,
) -> Response:
    return _download(request, session, blobs, signer, image_id, "thumb", expires, signature)


def _label_for_image(session: Session, user: User, data: ImageLabelBody) -> Label:
    label = get_label(session, user, data.label_id, referenced=True)
    if label.type == LabelType.VALUE and data.value is None:
        raise BadRequestError(
            f"Label '{label.name}' is a value label: send a 'value'.", code="value_required"
        )
    if label.type != LabelType.VALUE and data.value is not None:
        raise BadRequestError(
            f"Label '{label.name}' is a {label.type}; only value labels take a 'value'.",
            code="unexpected_value",
        )
    return label


@router.post("/{image_id}/add-label", response_model=ImagePublic)
def add_label(
    image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser, data: ImageLabelBodyDep
) -> Any:
    """Attach a label (with ``value`` for a regression label). Attaching it again sets the value."""
    image = get_image(session, user, image_id)
    label = _label_for_image(session, user, data)
    link = next((link for link in image.label_links if link.label_id == label.id), None)
    if link is None:
        image.label_links.append(ImageLabel(label_id=label.id, value=data.value))
    else:
        link.value = data.value
    session.commit()
    return image_public(get_image(session, user, image_id), request)


@router.post("/{image_id}/update-label", response_model=ImagePublic)
def update_label(
    image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser, data: ImageLabelBodyDep
) -> Any:
    """Change the value of a regression label already on the image."""
    image = get_image(session, user, image_id)
    label = _label_for_image(session, user, data)
    link = next((link for link in image.label_links if link.label_id == label.id), None)
    if link is None:
        raise BadRequestError(
            f"Label '{label.name}' is not on image {image.id}; add it first.", code="label_not_on_image"
        )
    link.value = data.value
    session.commit()
    return image_public(get_image(session, user, image_id), request)


# The public docs name the same operation "update-value".
router.add_api_route(
    "/{image_id}/update-value",
    update_label,
    methods=["POST"],
    response_model=ImagePublic,
    operation_id="update_value",
    summary="Update Value",
)


@router.post("/{image_id}/remove-label", response_model=ImagePublic)
def remove_label(
    image_id: ImageIdPath, request: Request, session: SessionDep, user: CurrentUser, data: ImageLabelBodyDep
) -> Any:
    """Take a label off the image."""
    image = get_image(session, user, image_id)
    label = get_label(session, user, data.label_id, referenced=True)
    image.label_links[:] = [link for link in image.label_links if link.label_id != label.id]
    session.commit()
    return image_public(get_image(session, user, image_id), request)
