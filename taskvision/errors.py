"""Every error TaskVision raises on purpose, in one place.

Each class says which HTTP status it maps to (``status``) and a stable machine
code (``code``) that clients can switch on. They inherit the closest built-in
exception too, so library code can catch ``LookupError`` or ``ValueError``
without knowing about HTTP. The API turns them into
``{"detail": str(error), "code": error.code}`` in exactly one handler.
"""

from __future__ import annotations


class TaskVisionError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status: int = 500
    code: str = "internal_error"
    extra: dict[str, object] = {}  # more fields of the JSON answer  # noqa: RUF012 - read-only default

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class BadRequestError(TaskVisionError, ValueError):
    """400: the request is well-formed JSON but asks for something invalid."""

    status = 400
    code = "bad_request"


class InvalidImageError(BadRequestError):
    """400: the bytes are not a decodable image, or not valid base64."""

    code = "invalid_image"


class NotTrainableError(BadRequestError):
    """400: the task's data cannot pass validation; the answer lists why, the counts, the images at fault."""

    code = "not_trainable"

    def __init__(self, problems: list[str], *, counts: dict[str, int], image_ids: list[str]) -> None:
        super().__init__("The task cannot be trained yet: " + "; ".join(problems) + ".")
        self.extra = {"problems": problems, "counts": counts, "image_ids": image_ids}


class ImageGeometryError(InvalidImageError):
    """400: the image's shape is refused before decoding (an extreme aspect ratio)."""

    code = "image_geometry"


class ImageFetchError(BadRequestError):
    """400: an image URL could not be fetched (refused target, timeout, HTTP error)."""

    code = "image_fetch_failed"


class AuthenticationError(TaskVisionError, PermissionError):
    """401: no token, or a token we do not know."""

    status = 401
    code = "not_authenticated"


class NotFoundError(TaskVisionError, LookupError):
    """404: the object does not exist *or belongs to another workspace* (never tell which)."""

    status = 404
    code = "not_found"


class ConflictError(TaskVisionError):
    """409: the request conflicts with the current state (e.g. deleting a production model)."""

    status = 409
    code = "conflict"


class DuplicateImageError(ConflictError):
    """An identical image already exists in the workspace.

    Answered with 400 and a detail of the form ``... image ID: <uuid>``, which is
    what ``ximilar-client`` parses to reuse the existing image.
    """

    status = 400
    code = "duplicate_image"

    def __init__(self, image_id: str) -> None:
        super().__init__(f"Training image already exists in this workspace, image ID: {image_id}")
        self.image_id = image_id


class PayloadTooLargeError(TaskVisionError):
    """413: the request or the image is bigger than the configured cap."""

    status = 413
    code = "too_large"


class ImageTooLargeError(PayloadTooLargeError):
    """413: the image declares more pixels than allowed (decompression bomb guard)."""

    code = "image_too_large"


class TooManyRequestsError(TaskVisionError):
    """429: a per-token or per-workspace limit was reached; retry after ``retry_after`` seconds."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(detail, code=code)
        self.retry_after = max(1, retry_after)


class ServiceUnavailableError(TaskVisionError):
    """503: a dependency (model, storage) is not ready; retry later (``retry_after`` seconds)."""

    status = 503
    code = "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 10) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
