"""The console's pages through the TestClient: what each shows, what each form changes, and tenancy."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

from fastapi import FastAPI

from api.db.models import Task
from api.services.versions import import_bundle
from taskvision.task_types import TaskType
from tests.console.conftest import ConsoleFactory, ConsoleUser, add_label, create_task, flash, location
from tests.support.console_data import evaluated_bundle
from tests.support.images import image_bytes, shape_image


def _rest(user: ConsoleUser, path: str) -> dict:  # type: ignore[type-arg]
    answer = user.client.get(f"/recognition/v2/{path}", headers=user.api)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _upload(user: ConsoleUser, task_id: str, name: str, data: bytes, label_id: str = "") -> dict:  # type: ignore[type-arg]
    answer = user.client.post(
        f"/console/tasks/{task_id}/images/upload",
        files={"file": (name, data)},
        data={"label_id": label_id} if label_id else {},
        headers={"X-CSRF-Token": user.csrf},
    )
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def _import(
    app: FastAPI, tmp_path: Path, task_id: str, names: list[str], task_type: TaskType, seed: int = 0
) -> None:
    folder = evaluated_bundle(tmp_path / f"bundle-{task_id}-{seed}", task_type, names, seed=seed)
    with app.state.services.session_factory() as session:
        task = session.get(Task, task_id)
        import_bundle(session, app.state.services.blobs, task, folder, production=True)


def test_the_task_list_shows_type_counts_production_and_last_training(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console, "Rooms")
    circle = add_label(console, task_id, "circle")
    add_label(console, task_id, "square")
    for i in range(3):
        _upload(console, task_id, f"c{i}.png", shape_image("circle", i), circle)
    _import(app, tmp_path, task_id, ["circle", "square"], TaskType.MULTI_CLASS)
    page = console.get("/console/tasks").text
    row = re.search(r"<tr>\s*<th scope=\"row\"><a[^>]*>Rooms</a>.*?</tr>", page, re.S)
    assert row, page
    cells = [re.sub(r"<[^>]+>|\s+", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row[0], re.S)]
    assert cells[:4] == ["Categorization", "2", "3", "version 1"]
    assert cells[4].startswith("trained")


def test_creating_a_task_with_a_bad_name_says_why(console: ConsoleUser) -> None:
    answer = console.post("/console/tasks", {"name": "   ", "type": "multi_class"})
    assert flash(console, answer).startswith("error: Invalid request: name")
    assert _rest(console, "task/")["count"] == 0


def test_labels_are_created_renamed_detached_and_attached(console: ConsoleUser) -> None:
    task_id = create_task(console)
    bed = add_label(console, task_id, "bedroom")
    kitchen = add_label(console, task_id, "kitchen")
    answer = console.post(f"/console/tasks/{task_id}/labels/{bed}/rename", {"name": "sleeping room"})
    assert flash(console, answer) == "ok: Label renamed."
    answer = console.post(f"/console/tasks/{task_id}/labels/{kitchen}/detach")
    assert "detached" in flash(console, answer)
    assert [lb["name"] for lb in _rest(console, f"task/{task_id}")["labels"]] == ["sleeping room"]
    page = console.get(f"/console/tasks/{task_id}").text
    assert f'<option value="{kitchen}">kitchen</option>' in page  # offered again
    answer = console.post(f"/console/tasks/{task_id}/labels/attach", {"label_id": kitchen})
    assert flash(console, answer) == "ok: Label attached."
    page = console.get(f"/console/tasks/{task_id}").text
    assert (
        "at least 2 are needed" not in page
        and "&#39;kitchen&#39; has 0 image(s); at least 20 are needed (20 more)" in page
    )


def test_a_tagging_task_shows_its_negative_label_which_stays(console: ConsoleUser) -> None:
    task_id = create_task(console, "Tags", "multi_label")
    add_label(console, task_id, "red")
    page = console.get(f"/console/tasks/{task_id}").text
    negative = next(lb for lb in _rest(console, f"task/{task_id}")["labels"] if lb["negative_for_task"])
    assert "images with none of the tags" in page and f"/labels/{negative['id']}/detach" not in page
    answer = console.post(f"/console/tasks/{task_id}/labels/{negative['id']}/detach")
    assert flash(console, answer) == "error: The negative label of a tagging task cannot be removed from it."


def test_a_regression_task_shows_its_value_label_and_value_range(console: ConsoleUser) -> None:
    task_id = create_task(console, "Ages", "regression")
    age = add_label(console, task_id, "age")
    ids = [_upload(console, task_id, f"{i}.png", image_bytes(i))["uploaded"] for i in range(2)]
    assert ids == [1, 1]
    images = _rest(console, "training-image/")["results"]
    for image, value in zip(images, ("12.5", "61"), strict=True):
        answer = console.client.post(
            f"/console/tasks/{task_id}/images/{image['id']}/value",
            data={"value": value},
            headers={"X-CSRF-Token": console.csrf, "HX-Request": "true"},
        )
        assert answer.status_code == 200 and 'role="status">Saved</span>' in answer.text
        assert f'value="{float(value)}"' in answer.text
    refused = console.client.post(
        f"/console/tasks/{task_id}/images/{images[0]['id']}/value",
        data={"value": "young"},
        headers={"X-CSRF-Token": console.csrf, "HX-Request": "true"},
    )
    assert 'role="alert"' in refused.text and 'value="12.5"' in refused.text
    page = console.get(f"/console/tasks/{task_id}").text
    assert "value label" in page and "12.50 \u2013 61.00" in page
    assert [lb["value"] for im in _rest(console, "training-image/")["results"] for lb in im["labels"]] == [
        12.5,
        61.0,
    ]
    assert age


def test_deleting_a_task_is_confirmed_with_what_goes_and_what_stays(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console, "Doomed", "multi_label")
    red = add_label(console, task_id, "red")
    _upload(console, task_id, "a.png", image_bytes(1), red)
    _import(app, tmp_path, task_id, ["red"], TaskType.MULTI_LABEL)
    page = re.sub(r"\s+", " ", console.get(f"/console/tasks/{task_id}/delete").text)
    for said in (
        "1 model version and their model files",
        "0 training runs",
        "its negative label",
        "its links to its 1 label",
        "the labels themselves, and the 1 image that carry them",
    ):
        assert said in page, said
    answer = console.post(f"/console/tasks/{task_id}/delete")
    assert (
        location(answer) == "/console/tasks"
        and flash(console, answer) == "ok: Task &#39;Doomed&#39; deleted."
    )
    assert console.client.get(f"/recognition/v2/task/{task_id}", headers=console.api).status_code == 404
    assert _rest(console, "training-image/")["count"] == 1


def test_uploads_take_images_and_zips_and_say_what_became_of_each(console: ConsoleUser) -> None:
    task_id = create_task(console)
    circle = add_label(console, task_id, "circle")
    square = add_label(console, task_id, "square")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("shapes/circle/one.png", shape_image("circle", 1))
        zf.writestr("shapes/circle/two.png", shape_image("circle", 2))
        zf.writestr("shapes/SQUARE/three.png", shape_image("square", 3))
        zf.writestr("shapes/other/four.png", shape_image("square", 4))
        zf.writestr("shapes/readme.txt", b"not an image")
        zf.writestr("__MACOSX/shapes/._one.png", b"resource fork")
    summary = _upload(console, task_id, "shapes.zip", archive.getvalue())
    assert {k: summary[k] for k in ("uploaded", "duplicates", "not_images", "too_large", "failed")} == {
        "uploaded": 4,
        "duplicates": 0,
        "not_images": 1,
        "too_large": 0,
        "failed": 0,
    }
    assert summary["problems"][0].startswith("shapes/readme.txt: ")
    again = _upload(console, task_id, "again.png", shape_image("square", 4), square)
    assert (again["uploaded"], again["duplicates"]) == (0, 1)
    labels = {
        image["meta_data"]["file_name"]: [lb["name"] for lb in image["labels"]]
        for image in _rest(console, "training-image/")["results"]
    }
    assert labels == {
        "shapes/circle/one.png": ["circle"],
        "shapes/circle/two.png": ["circle"],
        "shapes/SQUARE/three.png": ["square"],
        "shapes/other/four.png": ["square"],  # the label chosen for the re-upload
    }
    assert circle


def test_bulk_edits_keep_one_category_per_image(console: ConsoleUser) -> None:
    task_id = create_task(console)
    circle = add_label(console, task_id, "circle")
    square = add_label(console, task_id, "square")
    for i in range(3):
        _upload(console, task_id, f"{i}.png", shape_image("circle", i), circle)
    ids = [image["id"] for image in _rest(console, "training-image/")["results"]]
    back = f"/console/tasks/{task_id}/images?show=all"
    answer = console.post(
        f"/console/tasks/{task_id}/images/bulk",
        {"action": "set-label", "label_id": square, "image_ids": ids[:2], "back": back},
    )
    assert location(answer) == back and flash(console, answer) == "ok: &#39;square&#39; set on 2 images."
    names = sorted(lb["name"] for im in _rest(console, "training-image/")["results"] for lb in im["labels"])
    assert names == ["circle", "square", "square"]
    answer = console.post(f"/console/tasks/{task_id}/images/bulk", {"action": "test", "image_ids": ids[:1]})
    assert flash(console, answer) == "ok: 1 image marked as test images."
    page = console.get(f"/console/tasks/{task_id}/images?show=test").text
    assert page.count("data-pick>") == 1 and 'Test images <span class="count">1</span>' in page
    answer = console.post(
        f"/console/tasks/{task_id}/images/bulk",
        {"action": "remove-label", "label_id": square, "image_ids": ids},
    )
    assert flash(console, answer) == "ok: &#39;square&#39; removed from 3 images."
    page = console.get(f"/console/tasks/{task_id}/images?show=unlabelled").text
    assert 'Unlabelled <span class="count">2</span>' in page
    answer = console.post(f"/console/tasks/{task_id}/images/bulk", {"action": "delete", "image_ids": ids})
    assert flash(console, answer) == "ok: 3 images deleted."
    assert _rest(console, "training-image/")["count"] == 0
    answer = console.post(f"/console/tasks/{task_id}/images/bulk", {"action": "delete"})
    assert flash(console, answer) == "error: Select at least one image first."


def test_the_grid_pages_filters_and_serves_lazy_thumbnails(console: ConsoleUser) -> None:
    task_id = create_task(console)
    circle = add_label(console, task_id, "circle")
    for i in range(65):
        _upload(console, task_id, f"{i}.png", image_bytes(i), circle)
    first = console.get(f"/console/tasks/{task_id}/images").text
    assert first.count("data-pick>") == 60 and "Page 1 of 2" in first
    assert first.count('loading="lazy"') == 60
    second = console.get(f"/console/tasks/{task_id}/images?show=all&page=2").text
    assert second.count("data-pick>") == 5
    thumb = re.search(r'src="(/console/images/[^"]+/thumb)"', first)[1]
    answer = console.get(thumb)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert console.get(thumb, headers={"If-None-Match": answer.headers["etag"]}).status_code == 304


def test_versions_switch_production_compare_and_evaluate(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console)
    add_label(console, task_id, "circle")
    add_label(console, task_id, "square")
    _import(app, tmp_path, task_id, ["circle", "square"], TaskType.MULTI_CLASS, seed=1)
    _import(app, tmp_path, task_id, ["circle", "square"], TaskType.MULTI_CLASS, seed=2)
    page = console.get(f"/console/tasks/{task_id}/versions").text
    assert page.count("Make version") == 1 and "Make version 1 production" in page
    answer = console.post(f"/console/tasks/{task_id}/versions/production", {"version": "1"})
    assert flash(console, answer) == "ok: Version 1 is now in production."
    assert _rest(console, f"task/{task_id}")["production_version"] == 1
    refused = console.post(f"/console/tasks/{task_id}/versions/production", {"version": "9"})
    assert flash(console, refused) == f"error: Task {task_id} has no trained version 9."
    compared = console.get(f"/console/tasks/{task_id}/versions/compare?a=1&b=2").text
    assert "Version 1 and version 2" in compared and "F1 per label" in compared
    evaluation = console.get(f"/console/tasks/{task_id}/versions/2").text
    assert "Predicted label" in evaluation and "Actual label" in evaluation
    assert re.search(
        r'class="cell heat-\d diagonal" data-actual="circle" data-predicted="circle"', evaluation
    )
    assert "Canary" not in page  # embedded mode has none


def test_the_canary_share_is_set_and_cleared(console: ConsoleUser) -> None:
    """Cluster mode shows the form; the route is the REST PATCH's own, whatever the mode."""
    task_id = create_task(console)
    answer = console.post(f"/console/tasks/{task_id}/versions/canary", {"canary_percent": "25"})
    assert flash(console, answer) == "ok: New versions get 25 % of the traffic first."
    assert _rest(console, f"task/{task_id}")["canary_percent"] == 25
    refused = console.post(f"/console/tasks/{task_id}/versions/canary", {"canary_percent": "150"})
    assert flash(console, refused).startswith("error: Invalid request: canary_percent")
    cleared = console.post(f"/console/tasks/{task_id}/versions/canary", {"canary_percent": ""})
    assert flash(console, cleared) == "ok: New versions get all traffic."
    assert _rest(console, f"task/{task_id}")["canary_percent"] is None


def test_tagging_and_regression_evaluations_show_their_figures(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    tags = create_task(console, "Tags", "multi_label")
    add_label(console, tags, "red")
    add_label(console, tags, "striped")
    _import(app, tmp_path, tags, ["red", "striped"], TaskType.MULTI_LABEL)
    page = console.get(f"/console/tasks/{tags}/versions/1").text
    assert (
        ">mAP<" in page and ">AP<" in page and ">Threshold<" in page and 'table class="confusion"' not in page
    )
    ages = create_task(console, "Ages", "regression")
    add_label(console, ages, "age")
    _import(app, tmp_path, ages, ["age"], TaskType.REGRESSION)
    page = console.get(f"/console/tasks/{ages}/versions/1").text
    assert ">MAE<" in page and ">RMSE<" in page and ">R²<" in page


def test_try_it_answers_with_probabilities_and_refuses_private_urls(
    app: FastAPI, console: ConsoleUser, tmp_path: Path
) -> None:
    task_id = create_task(console)
    add_label(console, task_id, "circle")
    add_label(console, task_id, "square")
    assert "No version to try yet" in console.get(f"/console/tasks/{task_id}/try").text
    _import(app, tmp_path, task_id, ["circle", "square"], TaskType.MULTI_CLASS)
    answer = console.client.post(
        f"/console/tasks/{task_id}/try",
        data={"csrf_token": console.csrf, "version": "1"},
        files={"file": ("probe.png", shape_image("circle", 5))},
    )
    assert answer.status_code == 200
    assert answer.text.count('class="prob') >= 2 and "Best label:" in answer.text
    assert 'src="data:image/jpeg;base64,' in answer.text
    private = console.client.post(
        f"/console/tasks/{task_id}/try",
        data={"csrf_token": console.csrf, "url": "http://127.0.0.1:1/x.png"},
    )
    assert private.status_code == 200 and 'class="flash flash-error" role="alert"' in private.text


def test_another_workspaces_objects_are_404_pages(
    make_console: ConsoleFactory, app: FastAPI, tmp_path: Path
) -> None:
    alice, bob = make_console("alice"), make_console("bob")
    task_id = create_task(bob, "Bob's")
    label = add_label(bob, task_id, "mine")
    add_label(bob, task_id, "yours")
    _upload(bob, task_id, "b.png", image_bytes(3), label)
    image_id = _rest(bob, "training-image/")["results"][0]["id"]
    _import(app, tmp_path, task_id, ["mine", "yours"], TaskType.MULTI_CLASS)
    for path in ("", "/images", "/train", "/review", "/versions", "/versions/1", "/try", "/delete"):
        answer = alice.get(f"/console/tasks/{task_id}{path}")
        assert answer.status_code == 404 and "Not found" in answer.text, path
        assert "Bob&#39;s" not in answer.text
    assert alice.get(f"/console/images/{image_id}/thumb").status_code == 404
    assert alice.post(f"/console/tasks/{task_id}/delete").status_code == 404
    alice_task = create_task(alice, "Alice's")
    alice_label = add_label(alice, alice_task, "a")
    answer = alice.post(
        f"/console/tasks/{alice_task}/images/bulk",
        {"action": "set-label", "label_id": alice_label, "image_ids": [image_id]},
    )
    assert flash(alice, answer) == "error: Select at least one image first."
    assert [lb["name"] for lb in _rest(bob, f"training-image/{image_id}")["labels"]] == ["mine"]
    assert _rest(bob, f"task/{task_id}")["name"] == "Bob's"


def test_the_account_page_shows_the_workspace_and_the_tokens_first_characters(console: ConsoleUser) -> None:
    page = console.get("/console/account").text
    user = console.client.get("/account/v2/user", headers=console.api).json()
    assert user["workspace"] in page and f"<code>{console.token[:5]}…</code>" in page
    assert console.token not in page


def test_odd_form_values_are_answered_never_a_500(console: ConsoleUser) -> None:
    task_id = create_task(console)
    label = add_label(console, task_id, "circle")
    odd = console.post(
        f"/console/tasks/{task_id}/images/bulk",
        {"action": "set-label", "label_id": label, "image_ids": ["bad\x00id", "x" * 5000]},
    )
    assert flash(console, odd) == "error: Select at least one image first."
    for version in ("\u00b2", "99999999999999999999", "-1"):
        answer = console.post(f"/console/tasks/{task_id}/versions/production", {"version": version})
        assert flash(console, answer).startswith("error: "), version
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a\x01b\x7f.png", image_bytes(9))
    assert _upload(console, task_id, "odd.zip", archive.getvalue(), label)["uploaded"] == 1
    names = [image["meta_data"]["file_name"] for image in _rest(console, "training-image/")["results"]]
    assert names == ["ab.png"]  # control characters are not kept
