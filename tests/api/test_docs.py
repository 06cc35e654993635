"""/docs and /redoc work offline (every asset is ours), and the schema says how to sign in."""

from __future__ import annotations

import re
from urllib.parse import urljoin

from fastapi.testclient import TestClient


def _assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


def test_swagger_ui_and_redoc_load_only_our_own_assets(anonymous: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        response = anonymous.get(page)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        html = response.text
        assert "cdn." not in html and "fonts.googleapis" not in html
        assets = _assets(html)
        assert assets, page
        for asset in assets:
            assert not re.match(r"^(https?:)?//", asset), f"{page} loads {asset} from another origin"
            fetched = anonymous.get(urljoin(page, asset))
            assert fetched.status_code == 200, asset
            assert len(fetched.content) > 1000, asset  # the real bundle, not an error page
    # Swagger UI reads the schema from us and sends nothing to the public validator.
    assert "/openapi.json" in anonymous.get("/docs").text
    assert '"validatorUrl": null' in anonymous.get("/docs").text


def test_the_schema_has_the_token_scheme_and_typed_operations(anonymous: TestClient) -> None:
    schema = anonymous.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["Token"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": schemes["Token"]["description"],
    }
    create = schema["paths"]["/recognition/v2/task"]["post"]
    assert create["security"] == [{"Token": []}, {"Bearer": []}]
    body = create["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data", "application/x-www-form-urlencoded"}
    task_create = schema["components"]["schemas"]["TaskCreate"]
    assert set(task_create["properties"]) >= {"name", "type", "description"}
    assert task_create["properties"]["type"]["$ref"] == "#/components/schemas/TaskType"
    assert schema["components"]["schemas"]["TaskType"]["enum"] == ["multi_class", "multi_label", "regression"]
    train = schema["paths"]["/recognition/v2/task/{task_id}/train"]["post"]
    assert train["requestBody"]["required"] is False
    assert "TrainRequest" in str(train["requestBody"])
    error = schema["components"]["schemas"]["ErrorPublic"]
    assert error["properties"]["detail"]["type"] == "string"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert "ErrorPublic" in str(answer) or "NotReady" in str(answer), (path, method, status)
    assert "/healthz" in schema["paths"] and "security" not in schema["paths"]["/healthz"]["get"]


def test_a_method_a_path_does_not_have_answers_405_with_allow(client: TestClient) -> None:
    response = client.request("TRACE", "/recognition/v2/task")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"
    assert response.headers["Allow"] == "GET, HEAD, POST"
    # /training-image/update is its own operation (not an image id): only POST is documented there.
    assert client.request("OPTIONS", "/recognition/v2/training-image/update").headers["Allow"] == "POST"
