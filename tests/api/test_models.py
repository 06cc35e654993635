"""Model versions: listing by task, detail, and the production guard on delete."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient

from api.db.models import Model, Task
from tests.support.api import create_task


def _add(app, task_id: str, version: int) -> str:
    with app.state.services.session_factory() as session:
        task = session.get(Task, task_id)
        model = Model(
            workspace_id=task.workspace_id,
            task_id=task_id,
            version=version,
            train_status="TRAINED",
            metrics={"accuracy": 0.5 + version / 10},
            created=datetime.now(UTC),
        )
        session.add(model)
        session.commit()
        return model.id


def test_list_get_and_delete_models(app, client: TestClient) -> None:
    task, other = create_task(client, name="rooms"), create_task(client, name="other")
    ids = [_add(app, task["id"], v) for v in (1, 2)]
    _add(app, other["id"], 1)
    listed = client.get(f"/recognition/v2/model/?task={task['id']}").json()
    assert listed["count"] == 2
    assert [m["version"] for m in listed["results"]] == [2, 1]
    detail = client.get(f"/recognition/v2/model/{ids[0]}").json()
    assert detail == {
        "id": ids[0],
        "task": task["id"],
        "task_name": "rooms",
        "version": 1,
        "train_status": "TRAINED",
        "production": False,
        "metrics": {"accuracy": 0.6},
        "run_id": None,  # added by hand, not by a training run
        "created": detail["created"],
    }
    client.patch(f"/recognition/v2/task/{task['id']}", json={"production_version": 2})
    refused = client.delete(f"/recognition/v2/model/{ids[1]}/")
    assert refused.status_code == 409 and "production" in refused.json()["detail"]
    assert client.get(f"/recognition/v2/model/{ids[1]}").json()["production"] is True
    assert client.delete(f"/recognition/v2/model/{ids[0]}/").status_code == 204
    assert client.get(f"/recognition/v2/model/{ids[0]}").status_code == 404
    assert client.get("/recognition/v2/model").json()["count"] == 2
    assert client.get("/recognition/v2/model/?task=00000000-0000-4000-8000-000000000000").status_code == 404
