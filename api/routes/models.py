"""/recognition/v2/model: trained model versions of a task (registered by the run watcher)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Query, Request, Response
from sqlalchemy import select

from api.db.models import Model, TrainingImage
from api.deps import BlobsDep, ClassifierDep, CurrentUser, ModelIdPath, SessionDep
from api.http.openapi import COMMON, errors
from api.http.pagination import PageDep, paginate, paginate_list
from api.http.routing import SlashAgnosticRouter
from api.presenters import ImageLinks, model_public
from api.schemas.common import ID_PATTERN, NO_NUL, Page
from api.schemas.models import EvaluationReport, ImageLinksPublic, ImagePredictionPublic, ModelPublic
from api.services import evaluations
from api.services.lookups import get_model, get_task
from taskvision.errors import ConflictError

router = SlashAgnosticRouter(prefix="/recognition/v2/model", tags=["models"], responses=errors(*COMMON))


@router.get("/", response_model=Page[ModelPublic])
def list_models(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    page: PageDep,
    task: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this task's versions.")] = None,
) -> Any:
    """Model versions of the workspace, newest version first."""
    stmt = select(Model).where(Model.workspace_id == user.workspace_id)
    if task:
        stmt = stmt.where(Model.task_id == get_task(session, user, task).id)
    stmt = stmt.order_by(Model.task_id, Model.version.desc())
    return paginate(
        session, stmt, request=request, page=page, serialize=lambda rows: [model_public(m) for m in rows]
    )


@router.get("/{model_id}", response_model=ModelPublic)
def get_model_detail(model_id: ModelIdPath, session: SessionDep, user: CurrentUser) -> Any:
    return model_public(get_model(session, user, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response, responses=errors(409))
def delete_model(
    model_id: ModelIdPath, session: SessionDep, user: CurrentUser, blobs: BlobsDep, classifier: ClassifierDep
) -> Response:
    """Delete a version that is not in production, with its bundle."""
    model = get_model(session, user, model_id)
    if model.task.production_version == model.version:
        raise ConflictError(
            f"Version {model.version} is in production for task '{model.task.name}'; "
            "switch production to another version first."
        )
    prefix = model.bundle_uri
    classifier.unload_version(model.task_id, model.version)
    evaluations.forget(blobs, model)
    session.delete(model)
    session.commit()
    if prefix:
        blobs.delete_prefix(prefix)
    return Response(status_code=204)


LabelQuery = Annotated[str | None, Query(max_length=256, pattern=NO_NUL, description="A label id or name.")]


@router.get("/{model_id}/predictions", response_model=Page[ImagePredictionPublic])
def list_predictions(
    model_id: ModelIdPath,
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    blobs: BlobsDep,
    page: PageDep,
    wrong: Annotated[bool | None, Query(description="Only wrong (true) or right (false) answers.")] = None,
    true_label: LabelQuery = None,
    predicted_label: LabelQuery = None,
    split: Annotated[
        Literal["test", "train", "all"],
        Query(description="test: the test split; train: training images answered out of fold; all."),
    ] = "test",
    order: Annotated[
        Literal["-confidence", "confidence"],
        Query(
            description="-confidence: most confident first (regression: largest error); confidence: least."
        ),
    ] = "-confidence",
) -> Any:
    """What the version answered for each image of its evaluation, with links to the images.

    ``wrong=true`` lists its mistakes, the most confident first; ``true_label`` and
    ``predicted_label`` pick a cell of the confusion matrix. Versions trained before
    per-image predictions (and imported bundles) have none.
    """
    model = get_model(session, user, model_id)
    wanted = evaluations.PredictionFilter(
        split=split, wrong=wrong, true_label=true_label, predicted_label=predicted_label, order=order
    )
    chosen = evaluations.select(evaluations.read_predictions(blobs, model), wanted)

    def serialize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [str(r["image_id"]) for r in records]
        images = {
            image.id: image
            for image in session.scalars(
                select(TrainingImage).where(
                    TrainingImage.id.in_(ids), TrainingImage.workspace_id == user.workspace_id
                )
            )
        }
        links = ImageLinks(request)
        results = []
        for record in records:
            image = images.get(str(record["image_id"]))
            link = (
                ImageLinksPublic(img_path=links.url(image, "file"), thumb_img_path=links.url(image, "thumb"))
                if image is not None
                else None
            )
            results.append(ImagePredictionPublic(**record, image=link).model_dump(mode="json"))
        return results

    return paginate_list(chosen, request=request, page=page, serialize=serialize)


@router.get(
    "/{model_id}/report",
    response_model=EvaluationReport,
    responses={200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}},
)
def get_report(
    model_id: ModelIdPath,
    session: SessionDep,
    user: CurrentUser,
    blobs: BlobsDep,
    format: Annotated[
        Literal["json", "markdown"], Query(description="json (default) or markdown (the report alone).")
    ] = "json",
) -> Any:
    """The version's evaluation report: the Markdown report, every metric, the model selection."""
    report = evaluations.report(blobs, get_model(session, user, model_id))
    if format == "markdown":
        return Response(report["markdown"], media_type="text/markdown; charset=utf-8")
    return report
