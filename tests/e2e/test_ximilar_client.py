"""The unmodified ximilar-client 1.39.0 against the real ``taskvision serve`` over loopback HTTP.

Every test talks to one server subprocess (``live_server``). Tests that count or filter
images get a fresh user, i.e. an empty workspace, from ``taskvision users create``
run while the server is up.
"""

from __future__ import annotations

import base64
import io
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image as PILImage

if TYPE_CHECKING:
    from tests.support.live_server import LiveServer

ximilar_recognition = pytest.importorskip("ximilar.client.recognition")
RecognitionClient = ximilar_recognition.RecognitionClient

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class OutsideCallError(AssertionError):
    """The client tried to reach a host other than loopback (e.g. its licence check at api.ximilar.com)."""


@pytest.fixture(scope="module", autouse=True)
def loopback_only() -> Iterator[None]:
    """Refuse (and so make visible) every HTTP request the client sends outside loopback."""
    original = requests.sessions.Session.request

    def guarded(self: requests.Session, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        host = urlsplit(url).hostname
        if host not in LOOPBACK:
            raise OutsideCallError(f"{method} {url} leaves loopback")
        return original(self, method, url, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests.sessions.Session, "request", guarded)
        yield


@pytest.fixture
def fresh_client(live_server: LiveServer) -> Callable[[], tuple[Any, str]]:
    """Make a client for a brand-new user (empty workspace); returns (client, token)."""

    def make() -> tuple[Any, str]:
        token = live_server.new_user()
        return RecognitionClient(token=token, endpoint=live_server.base_url), token

    return make


# ---- image helpers ------------------------------------------------------------------

_colour = iter(range(1, 1_000_000))


def _png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    """A small PNG with a colour no other call of this module uses (so no accidental duplicates)."""
    n = next(_colour)
    image = PILImage.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n * 53 + n // 256) % 256))
    image.putpixel((0, 0), (n % 256, (n // 256) % 256, 7))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(size: tuple[int, int] = (80, 60)) -> bytes:
    buf = io.BytesIO()
    PILImage.open(io.BytesIO(_png_bytes(size))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def _noise_png(tmp_path: Path, size: tuple[int, int]) -> str:
    """A random-noise PNG: incompressible, so well over the client's 0.1 MB "send as is" limit."""
    rng = random.Random(1234)
    path = tmp_path / f"noise-{size[0]}x{size[1]}.png"
    PILImage.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3)).save(path, format="PNG")
    return str(path)


def _upload_one(client: Any, record: dict[str, Any]) -> Any:
    images, status = client.upload_images([record])
    assert status == {"status": "OK"}, status
    assert len(images) == 1
    return images[0]


def _ids(images: list[Any]) -> set[str]:
    return {image.id for image in images}


def _download(url: str, token: str) -> requests.Response:
    return requests.get(url, headers={"Authorization": f"Token {token}"}, timeout=10)


def _label_ids_on(client: Any, image_id: str) -> dict[str, float | None]:
    """label id -> value, as GET /training-image/{id} reports them."""
    image, status = client.get_image(image_id)
    assert image is not None, status
    labels, _ = image.get_labels()
    raw = client.get(f"recognition/v2/training-image/{image_id}")
    values = {entry["id"]: entry.get("value") for entry in raw["labels"]}
    assert {label.id for label in labels} == set(values)
    return values


# ---- construction and account -------------------------------------------------------


def test_client_talks_only_to_the_self_hosted_server(live_server: LiveServer) -> None:
    token = live_server.token

    # "localhost" in the endpoint: the client skips its licence call.
    by_name = RecognitionClient(token=token, endpoint=live_server.base_url)
    user = by_name.get_user_details()
    assert UUID4.match(user["id"]), user
    assert user["username"] == "e2e-owner"

    # An IP endpoint needs resource_name=None to skip it...
    by_ip = RecognitionClient(token=token, endpoint=live_server.ip_url, resource_name=None)
    assert by_ip.get_user_details()["id"] == user["id"]

    # ...because otherwise the constructor calls api.ximilar.com (refused here by the guard).
    with pytest.raises(OutsideCallError, match=re.escape("https://api.ximilar.com/authorization")):
        RecognitionClient(token=token, endpoint=live_server.ip_url)

    # A wrong token gets a JSON 401 the client can read.
    stranger = RecognitionClient(token="0" * 40, endpoint=live_server.base_url)
    assert "detail" in stranger.get_user_details()
    task, status = stranger.get_task("00000000-0000-4000-8000-000000000000")
    assert task is None and status["status"] == "Invalid token."


# ---- tasks ------------------------------------------------------------------------


def test_tasks_of_each_type_and_pagination(
    fresh_client: Callable[[], tuple[Any, str]], live_server: LiveServer
) -> None:
    client, token = fresh_client()

    cats, status = client.create_task("cats vs dogs", description="pets", task_type="multi_class")
    assert status == {"status": "OK"}
    tags, _ = client.create_task("scene tags", task_type="multi_label")
    reg, _ = client.create_task("age", task_type="regression")
    assert (cats.type, tags.type, reg.type) == ("multi_class", "multi_label", "regression")
    assert cats.description == "pets" and reg.description == ""
    for task in (cats, tags, reg):
        assert UUID4.match(task.id)
        assert task.last_train_status == "NOT_TRAINED"
        assert isinstance(task.production_version, int)

    # A tagging task comes with its negative label; the others have none.
    negative, _ = tags.get_negative_label()
    assert negative is not None
    assert negative.negative_for_task and negative.type == "tag"
    assert [label.id for label in tags.get_labels()[0]] == [negative.id]
    assert cats.get_negative_label() == (None, {"status": "OK"})
    assert reg.get_negative_label()[0] is None
    assert cats.get_labels()[0] == []

    fetched, status = client.get_task(tags.id)
    assert status == {"status": "OK"}
    assert (fetched.id, fetched.name, fetched.type) == (tags.id, "scene tags", "multi_label")

    # An unknown id answers a status carrying the server's detail.
    missing, status = client.get_task("00000000-0000-4000-8000-000000000000")
    assert missing is None and "not found" in status["status"]

    # A bad type is refused with a readable message.
    bad, status = client.create_task("nope", task_type="object_detection")
    assert bad is None and "type" in status["status"]

    # 23 tasks > one page of 20: get_all_tasks must follow `next`.
    created = [cats.id, tags.id, reg.id]
    for i in range(20):
        created.append(client.create_task(f"bulk task {i:02d}")[0].id)
    first_page = _download(f"{live_server.ip_url}recognition/v2/task", token).json()
    assert first_page["count"] == 23 and len(first_page["results"]) == 20
    assert first_page["next"] and first_page["next"].startswith("/recognition/v2/task")

    everything, status = client.get_all_tasks()
    assert status == {"status": "OK"}
    assert [task.id for task in everything] == created  # oldest first, none lost or repeated

    named, _ = client.get_tasks_by_name("bulk task 07")
    assert [task.id for task in named] == [created[3 + 7]]


# ---- labels -----------------------------------------------------------------------


def test_labels_attach_search_count_detach_remove(
    fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path
) -> None:
    client, _ = fresh_client()
    cats, _ = client.create_task("animals", task_type="multi_class")
    tags, _ = client.create_task("attributes", task_type="multi_label")
    reg, _ = client.create_task("weight", task_type="regression")

    cat, status = client.create_label("cat", description="a cat", output_name="Cat")
    assert status == {"status": "OK"}
    dog, _ = client.create_label("dog")
    fluffy, _ = client.create_label("fluffy", label_type="tag")
    kilos, _ = client.create_label("kilograms", label_type="value")
    assert (cat.type, fluffy.type, kilos.type) == ("category", "tag", "value")
    assert (cat.output_name, dog.output_name, cat.description) == ("Cat", "dog", "a cat")
    assert cat.get_images_count() == 0

    for task, label in ((cats, cat), (cats, dog), (tags, fluffy), (reg, kilos)):
        response = task.add_label(label.id)
        assert label.id in [entry["id"] for entry in response["labels"]], response
    # Adding twice is harmless.
    cats.add_label(cat.id)
    # A label of the wrong type is refused with a message the user can read.
    refused = cats.add_label(fluffy.id)
    assert "id" not in refused and "tag" in refused["detail"]

    assert [label.name for label in cats.get_labels()[0]] == ["cat", "dog"]
    tag_labels = {label.name: label for label in tags.get_labels()[0]}
    assert set(tag_labels) == {"fluffy", "attributes (negative)"}
    assert [label.id for label in reg.get_labels()[0]] == [kilos.id]
    assert cats.get_label_by_name("dog")[0].id == dog.id

    found, _ = client.get_labels_by_substring("O")  # case-insensitive substring
    assert {label.name for label in found} >= {"dog", "kilograms"}
    assert "cat" not in {label.name for label in found}
    assert client.get_labels_by_substring("zebra") == (None, {"status": "No labels found"})
    by_name, _ = client.get_label_by_name("fluffy")
    assert by_name.id == fluffy.id and by_name.type == "tag"
    assert client.get_label_by_name("fluff")[0] is None  # substring match is not a name match

    detail, status = client.get_label(cat.id)
    assert status == {"status": "OK"}
    assert (detail.name, detail.output_name, detail.tasks_count) == ("cat", "Cat", 1)
    assert [task["id"] for task in client.get(f"recognition/v2/label/{cat.id}")["recognition_tasks"]] == [
        cats.id
    ]
    annotate_tasks, _ = detail.get_annotate_tasks()
    assert [task.id for task in annotate_tasks] == [cats.id]

    # images_count follows uploads (get_images_count re-reads the label when it has no count).
    _upload_one(client, {"_file": _write(tmp_path, "a.png", _png_bytes()), "labels": [cat.id]})
    _upload_one(client, {"_file": _write(tmp_path, "b.png", _png_bytes()), "labels": [cat.id, fluffy.id]})
    assert client.get_label(cat.id)[0].get_images_count() == 2
    assert client.get_label(fluffy.id)[0].get_images_count() == 1
    stale = client.get_label(dog.id)[0]
    stale.images_count = -1
    assert stale.get_images_count() == 0

    # Detach from a task: the label stays, the task no longer lists it.
    cats.detach_label(dog.id)
    assert [label.name for label in cats.get_labels()[0]] == ["cat"]
    assert client.get_label(dog.id)[0].tasks_count == 0

    # The negative label cannot be detached or deleted on its own.
    negative, _ = tags.get_negative_label()
    assert "negative" in tags.detach_label(negative.id)["detail"]
    assert "detail" in client.remove_label(negative.id)
    assert client.get_label(negative.id)[0] is not None

    # Removing a label removes it from its tasks and images.
    removed = client.remove_label(cat.id)
    assert removed.status_code == 204
    assert client.get_label(cat.id) == (None, {"status": "label with id not found"})
    assert client.get_task(cats.id)[0].get_labels()[0] == []  # (cats caches its labels client-side)
    assert client.get_labels_by_substring("cat")[0] is None
    assert client.get_label(fluffy.id)[0].get_images_count() == 1


# ---- uploads ----------------------------------------------------------------------


def test_upload_images_every_way(
    fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path, live_server: LiveServer
) -> None:
    client, token = fresh_client()
    task, _ = client.create_task("weights", task_type="regression")
    kilos, _ = client.create_label("kg", label_type="value")
    task.add_label(kilos.id)
    cls_task, _ = client.create_task("kinds")
    cat, _ = client.create_label("cat")
    cls_task.add_label(cat.id)

    # _file, small PNG: sent as raw base64 and stored byte for byte.
    png = _png_bytes((64, 48))
    png_path = _write(tmp_path, "small.png", png)
    small = _upload_one(
        client, {"_file": png_path, "labels": [cat.id], "meta_data": {"source": "e2e", "n": 1}}
    )
    assert UUID4.match(small.id) and small.created
    assert (small.img_width, small.img_height) == (64, 48)
    assert small.meta_data == {"source": "e2e", "n": 1}
    assert small.test_image is False and small.real_image is False
    stored = _download(small.img_path, token)
    assert stored.status_code == 200 and stored.headers["content-type"] == "image/png"
    assert stored.content == png
    thumb = _download(small.thumb_img_path, token)
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    assert _label_ids_on(client, small.id) == {cat.id: None}
    # img_path is a signed link: it works without the token; the bare path needs the token.
    assert requests.get(small.img_path, timeout=10).content == png
    anonymous = requests.get(small.img_path.split("?")[0], timeout=10)
    assert anonymous.status_code == 401 and "detail" in anonymous.json()

    # _file over 0.1 MB: the client shrinks it (shorter side 512) and sends a data-URI JPEG.
    big_path = _noise_png(tmp_path, (800, 600))
    assert Path(big_path).stat().st_size > 0.1 * 1024 * 1024
    sent = client.load_base64_file(big_path)
    assert sent.startswith("data:image/jpeg;base64,")
    big = _upload_one(client, {"_file": big_path, "values": {kilos.id: 12.5}, "test_image": True})
    assert (big.img_width, big.img_height) == (682, 512)
    assert big.test_image is True
    stored = _download(big.img_path, token)
    assert stored.headers["content-type"] == "image/jpeg"
    assert stored.content == base64.b64decode(sent.split(",", 1)[1])
    assert PILImage.open(io.BytesIO(stored.content)).size == (682, 512)
    assert _label_ids_on(client, big.id) == {kilos.id: 12.5}

    # _base64 (bytes, as the client requires), real=True, regression value.
    jpeg = _jpeg_bytes((80, 60))
    b64 = _upload_one(
        client,
        {"_base64": base64.b64encode(jpeg), "values": {kilos.id: 3.0}, "real": True, "meta_data": {"k": "v"}},
    )
    assert (b64.img_width, b64.img_height) == (80, 60)
    assert _download(b64.img_path, token).content == jpeg
    image, _ = client.get_image(b64.id)
    assert image.real_image is True and image.meta_data == {"k": "v"} and image.test_image is False
    assert _label_ids_on(client, b64.id) == {kilos.id: 3.0}

    # A big CMYK TIFF (print workflows) sent as is: the server shrinks it (shorter side 1024) to a PNG.
    tiff = io.BytesIO()
    PILImage.new("CMYK", (1300, 1100), (10, 200, 30, 5)).save(tiff, format="TIFF")
    cmyk = _upload_one(client, {"_base64": base64.b64encode(tiff.getvalue())})
    assert (cmyk.img_width, cmyk.img_height) == (1210, 1024)
    stored = _download(cmyk.img_path, token)
    assert stored.headers["content-type"] == "image/png"
    assert PILImage.open(io.BytesIO(stored.content)).size == (1210, 1024)
    assert _download(cmyk.thumb_img_path, token).content[:3] == b"\xff\xd8\xff"

    # Several records in one call.
    batch, status = client.upload_images(
        [{"_file": _write(tmp_path, f"batch{i}.png", _png_bytes()), "labels": [cat.id]} for i in range(3)]
    )
    assert status == {"status": "OK"} and len(_ids(batch)) == 3

    count_before = client.get_training_images()[2]["count"]
    assert count_before == 7

    # The same bytes again: the server answers "... image ID: <uuid>" and the client returns that image,
    # applying the new record's labels to it.
    dup_label, _ = client.create_label("dog")
    again, status = client.upload_images([{"_file": png_path, "labels": [dup_label.id]}])
    assert status == {"status": "exists"}
    assert [image.id for image in again] == [small.id]
    assert client.get_training_images()[2]["count"] == count_before
    assert _label_ids_on(client, small.id) == {cat.id: None, dup_label.id: None}
    raw = client.post("recognition/v2/training-image", data={"base64": base64.b64encode(png).decode()})
    assert "already exists" in raw["detail"] and small.id in raw["detail"]

    # Garbage is refused with a message, and the client reports it as not uploaded.
    images, status = client.upload_images([{"_base64": base64.b64encode(b"not an image")}])
    assert images == [] and status["status"].startswith("image not uploaded")

    # Another user cannot see or download these images.
    other, other_token = fresh_client()
    assert other.get_image(small.id)[0] is None
    assert _download(small.img_path, other_token).status_code == 404
    assert live_server.is_alive()


# ---- filters and paging -------------------------------------------------------------


def test_filters_and_paging(fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path) -> None:
    client, _ = fresh_client()
    reg_task, _ = client.create_task("size", task_type="regression")
    size, _ = client.create_label("size", label_type="value")
    reg_task.add_label(size.id)
    cls_task, _ = client.create_task("kinds")
    red, _ = client.create_label("red")
    blue, _ = client.create_label("blue")
    cls_task.add_label(red.id)
    cls_task.add_label(blue.id)

    def up(name: str, **record: Any) -> str:
        return _upload_one(client, {"_file": _write(tmp_path, name, _png_bytes()), **record}).id

    reds = [up(f"red{i}.png", labels=[red.id]) for i in range(5)]
    blues = [up(f"blue{i}.png", labels=[blue.id], test_image=True) for i in range(3)]
    reals = [up(f"real{i}.png", labels=[red.id], real=True) for i in range(2)]
    sized = {up(f"size{v}.png", values={size.id: v}): v for v in (0.25, 0.5, 0.75)}
    unlabelled = [up("plain.png")]
    everything = [*reds, *blues, *reals, *sized, *unlabelled]

    images, next_page, info = client.get_training_images()
    assert [image.id for image in images] == everything  # oldest first, one page of 20
    assert next_page is None and info["count"] == 14

    assert _ids(client.get_training_images(test=True)[0]) == set(blues)
    assert _ids(client.get_training_images(real=True)[0]) == set(reals)
    assert _ids(client.get_training_images(real=False)[0]) == set(everything) - set(reals)
    assert client.get_training_images(verification=0)[2]["count"] == 14

    assert _ids(red.get_training_images()[0]) == {*reds, *reals}
    assert _ids(blue.get_training_images(test=True)[0]) == set(blues)
    assert _ids(red.get_training_images(not_label=True)[0]) == set(everything) - {*reds, *reals}
    assert _ids(size.get_training_images()[0]) == set(sized)
    (exact,) = [image_id for image_id, v in sized.items() if v == 0.5]
    assert _ids(size.get_training_images(value=0.5)[0]) == {exact}
    assert size.get_training_images(value=0.3)[0] == []

    # training_images_iter walks every page (3 per page here, so 5 pages).
    first = "recognition/v2/training-image/?page=1&page_size=3"
    page, next_page, info = client.get_training_images(page_url=first)
    assert len(page) == 3 and next_page and info["count"] == 14
    walked = [image.id for image in client.training_images_iter(page_url=first)]
    assert walked == everything
    batches = list(client.training_images_iter(page_url=first, batch_size=2))
    assert [image.id for batch in batches for image in batch] == everything

    # More than 20 images: the default page size cuts, `next` continues.
    more = [up(f"more{i}.png") for i in range(8)]
    page, next_page, info = client.get_training_images()
    assert len(page) == 20 and info["count"] == 22 and next_page
    rest, last_next, _ = client.get_training_images(page_url=next_page)
    assert [image.id for image in page + rest] == everything + more and last_next is None
    assert [image.id for image in client.training_images_iter()] == everything + more


# ---- modifying images ---------------------------------------------------------------


def test_modify_images(fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path) -> None:
    client, _ = fresh_client()
    reg_task, _ = client.create_task("score", task_type="regression")
    score, _ = client.create_label("score", label_type="value")
    reg_task.add_label(score.id)
    tag_task, _ = client.create_task("look", task_type="multi_label")
    shiny, _ = client.create_label("shiny", label_type="tag")
    matte, _ = client.create_label("matte", label_type="tag")
    tag_task.add_label(shiny.id)
    tag_task.add_label(matte.id)

    images = [_upload_one(client, {"_file": _write(tmp_path, f"m{i}.png", _png_bytes())}) for i in range(4)]
    one = images[0]

    # add_label / update_label / detach_label, regression values included.
    response = one.add_label(shiny.id)
    assert [entry["id"] for entry in response["labels"]] == [shiny.id]
    one.add_label(score.id, 0.1)
    assert _label_ids_on(client, one.id) == {shiny.id: None, score.id: 0.1}
    one.update_label(score.id, 0.9)
    assert _label_ids_on(client, one.id) == {shiny.id: None, score.id: 0.9}
    assert _ids(score.get_training_images(value=0.9)[0]) == {one.id}
    assert score.get_training_images(value=0.1)[0] == []
    assert "value" in one.add_label(score.id)["detail"]  # a value label needs a value
    assert "detail" in images[1].update_label(score.id, 1.0)  # not on that image yet
    one.detach_label(shiny.id)
    assert _label_ids_on(client, one.id) == {score.id: 0.9}
    assert client.add_label_to_image(one.id, matte.id)["id"] == one.id
    labels, _ = client.get_image(one.id)[0].get_labels()
    assert {label.name for label in labels} == {"score", "matte"}
    assert all(label.type for label in labels)

    # Meta data: add merges (on the client), clear empties.
    one.add_meta_data({"a": 1})
    one.add_meta_data({"b": [1, 2], "a": 2})
    assert one.meta_data == {"a": 2, "b": [1, 2]}
    assert client.get_image(one.id)[0].get_meta_data() == {"a": 2, "b": [1, 2]}
    one.clear_meta_data()
    assert one.meta_data == {} and client.get_image(one.id)[0].meta_data == {}

    # Test / real flags of one image.
    one.set_test(True)
    assert client.get_image(one.id)[0].test_image is True
    assert _ids(client.get_training_images(test=True)[0]) == {one.id}
    images[1].set_real(True)
    assert _ids(client.get_training_images(real=True)[0]) == {images[1].id}
    images[1].set_real(False)
    assert client.get_training_images(real=True)[0] == []

    # Bulk: by image ids...
    ids = [image.id for image in images[1:]]
    result = client.modify_images(images=ids, add_labels=[shiny.id], test=True)
    assert result["updated"] == 3
    assert _ids(shiny.get_training_images()[0]) == set(ids)
    assert _ids(client.get_training_images(test=True)[0]) == {image.id for image in images}
    # ...and by a label filter (every image with "shiny").
    result = client.modify_images(
        labels=[shiny.id], add_labels=[matte.id], remove_labels=[shiny.id], test=False, real=True
    )
    assert result["updated"] == 3
    assert shiny.get_training_images()[0] == []
    assert _ids(matte.get_training_images()[0]) == {image.id for image in images}
    assert client.get_training_images(test=True)[0][0].id == one.id
    assert _ids(client.get_training_images(real=True)[0]) == set(ids)
    with pytest.raises(ximilar_recognition.XimilarClientInvalidDataException):
        client.modify_images(add_labels=[matte.id])
    refused = client.modify_images(images=[ids[0]], add_labels=[score.id])
    assert "value" in refused["detail"]


# ---- deleting ---------------------------------------------------------------------


def test_delete_images_tasks_labels(
    fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path, live_server: LiveServer
) -> None:
    client, token = fresh_client()
    keep, _ = client.create_task("keep")
    drop, _ = client.create_task("drop via task.remove", task_type="multi_label")
    gone, _ = client.create_task("drop via client")
    cat, _ = client.create_label("cat")
    keep.add_label(cat.id)
    gone.add_label(cat.id)
    negative, _ = drop.get_negative_label()

    first = _upload_one(client, {"_file": _write(tmp_path, "d1.png", _png_bytes()), "labels": [cat.id]})
    second = _upload_one(client, {"_file": _write(tmp_path, "d2.png", _png_bytes()), "labels": [negative.id]})

    # Image: gone from the API and from the download URL.
    assert client.remove_image(first.id).status_code == 204
    assert client.get_image(first.id) == (None, {"status": "image with id not found"})
    after = _download(first.img_path, token)
    assert after.status_code == 404 and "not found" in after.json()["detail"]
    assert "detail" in client.remove_image(first.id)  # twice: a JSON 404, not a crash
    assert client.get_label(cat.id)[0].get_images_count() == 0

    # task.remove(): the task, its negative label and that label's image links go; the image stays.
    drop.remove()
    task, status = client.get_task(drop.id)
    assert task is None and status == {"status": f"Task {drop.id} not found."}
    assert client.get_label(negative.id)[0] is None
    assert _label_ids_on(client, second.id) == {}

    # client.remove_task(): its labels stay (they are shared).
    assert client.remove_task(gone.id).status_code == 204
    task, status = client.get_task(gone.id)
    assert task is None and "not found" in status["status"]
    label, _ = client.get_label(cat.id)
    assert label is not None and label.tasks_count == 1
    assert [t.id for t in client.get_all_tasks()[0]] == [keep.id]

    # client.remove_label(): gone from the task that used it.
    assert client.remove_label(cat.id).status_code == 204
    assert client.get_label(cat.id)[0] is None
    assert client.get_task(keep.id)[0].get_labels()[0] == []
    assert "detail" in client.remove_label(cat.id)
    assert client.remove_task(gone.id)["detail"].endswith("not found.")

    # Wipe a label: the label stays, no image carries it any more.
    dog, _ = client.create_label("dog")
    second.add_label(dog.id)
    dog.wipe()
    assert client.get_label(dog.id)[0].get_images_count() == 0
    assert _label_ids_on(client, second.id) == {}
    assert [image.id for image in client.training_images_iter()] == [second.id]
    assert live_server.is_alive()


# ---- an explicit workspace, label-side helpers, to_json --------------------------------


def test_explicit_workspace_and_label_side_calls(
    fresh_client: Callable[[], tuple[Any, str]], live_server: LiveServer
) -> None:
    plain, token = fresh_client()
    workspace = plain.get_user_details()["workspace"]
    assert UUID4.match(workspace)
    # With a workspace id the client adds ?workspace= to GET/DELETE and "workspace" to POST/PUT bodies.
    client = RecognitionClient(token=token, endpoint=live_server.base_url, workspace=workspace)

    task, status = client.create_task("flowers")
    assert status == {"status": "OK"} and task.workspace == workspace
    rose, _ = client.create_label("rose")
    tulip, _ = client.create_label("tulip")
    task.add_label(rose.id)
    task.add_label(tulip.id)
    assert [label.name for label in client.get_all_labels()[0]] == ["rose", "tulip"]

    # label.upload_images adds the label itself to each record.
    jpeg = _jpeg_bytes((40, 30))
    images, status = rose.upload_images([{"_base64": base64.b64encode(jpeg), "labels": [tulip.id]}])
    assert status == {"status": "OK"}
    (image,) = images
    assert set(_label_ids_on(client, image.id)) == {rose.id, tulip.id}
    rose.detach_image(image.id)
    assert set(_label_ids_on(client, image.id)) == {tulip.id}

    assert client.get_task(task.id)[0].to_json() == {
        "task_id": task.id,
        "name": "flowers",
        "type": "multi_class",
        "description": "",
        "labels": [rose.id, tulip.id],
    }
    as_json = client.get_image(image.id)[0].to_json()
    assert as_json["labels"] == [tulip.id] and as_json["label_names"] == ["tulip"]
    assert (as_json["img_width"], as_json["img_height"]) == (40, 30)
    assert [i.id for i in client.training_images_iter()] == [image.id]

    # Deletes carry ?workspace= too.
    assert client.remove_image(image.id).status_code == 204
    assert client.remove_task(task.id).status_code == 204
    assert client.remove_label(rose.id).status_code == 204
    assert [label.name for label in client.get_all_labels()[0]] == ["tulip"]

    # Naming another user's workspace is "not found", never a peek into it.
    stranger, _ = fresh_client()
    intruder = RecognitionClient(token=stranger.token, endpoint=live_server.base_url, workspace=workspace)
    assert intruder.get_all_tasks() == (None, {"detail": "Workspace not found.", "status": "ERROR"})
    assert intruder.create_task("sneaky") == (None, {"status": "Workspace not found."})
    assert intruder.get_label(tulip.id)[0] is None
    assert [label.name for label in client.get_all_labels()[0]] == ["tulip"]


def test_image_download_with_the_client(fresh_client: Callable[[], tuple[Any, str]], tmp_path: Path) -> None:
    client, _ = fresh_client()
    first_png, second_png = _png_bytes(), _png_bytes()
    first = _upload_one(client, {"_base64": base64.b64encode(first_png)})
    second = _upload_one(client, {"_base64": base64.b64encode(second_png)})
    # Image.download() sends no token and names the file after the URL's last segment.
    first_file, second_file = Path(first.download(str(tmp_path))), Path(second.download(str(tmp_path)))
    assert first_file.name == f"{first.id}.png" and second_file.name == f"{second.id}.png"
    assert first_file.read_bytes() == first_png
    assert second_file.read_bytes() == second_png


# ---- last: the server is still up ----------------------------------------------------


def test_server_survived_everything(live_server: LiveServer) -> None:
    assert live_server.is_alive(), live_server.log()
    assert requests.get(f"{live_server.ip_url}healthz", timeout=5).json() == {"status": "ok"}
    log = live_server.log()
    assert "Traceback" not in log and '" 500' not in log, log
