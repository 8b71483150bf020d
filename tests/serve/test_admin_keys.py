"""Key management over the API: an admin key creates (the secret shown once), lists (never a secret) and revokes
(at once) keys; other keys get 403; bad names and limits get 400."""

from __future__ import annotations

import httpx

from tests.serve.conftest import RunningServer
from tests.serve.test_api import assert_openai_error, bearer

KEYS = "/v1/admin/keys"


def test_admin_creates_lists_and_revokes_keys_over_the_api(server: RunningServer) -> None:
    admin = server.new_key("key-admin", scopes=("admin",))
    created = httpx.post(server.url + KEYS, headers=bearer(admin),
                         json={"name": "svc-bot", "scopes": ["chat"], "rpm": 30, "tpm": None})
    assert created.status_code == 201, created.text
    made = created.json()
    assert made["secret"].startswith(f"cf-{made['id']}-") and made["scopes"] == ["chat"]
    assert (made["name"], made["rpm"], made["tpm"], made["revoked"]) == ("svc-bot", 30, None, False)
    secret = made["secret"]
    assert httpx.get(server.url + "/v1/models", headers=bearer(secret)).status_code == 200  # now cached as valid

    listed = httpx.get(server.url + KEYS, headers=bearer(admin))
    assert listed.status_code == 200 and secret not in listed.text
    entry = next(k for k in listed.json()["data"] if k["id"] == made["id"])
    assert set(entry) == {"id", "object", "name", "scopes", "rpm", "tpm", "created", "revoked"}

    revoked = httpx.delete(f"{server.url}{KEYS}/{made['id']}", headers=bearer(admin))
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert_openai_error(httpx.get(server.url + "/v1/models", headers=bearer(secret)), 401, "authentication_error")
    assert_openai_error(httpx.delete(f"{server.url}{KEYS}/k_00000000", headers=bearer(admin)), 404,
                        "not_found_error", "key_not_found")


def test_key_management_needs_the_admin_scope_and_sane_input(server: RunningServer) -> None:
    user, admin = server.new_key("not-admin"), server.new_key("key-admin-2", scopes=("admin",))
    for method, path in (("POST", KEYS), ("GET", KEYS), ("DELETE", f"{KEYS}/k_00000000")):
        response = httpx.request(method, server.url + path, headers=bearer(user), json={"name": "x"})
        assert_openai_error(response, 403, "permission_error", "insufficient_scope")
    for body in ({"name": "evil\u001b[31m"}, {"name": ""}, {"name": "x", "scopes": ["root"]},
                 {"name": "x", "rpm": True}, {"name": "x", "rpm": 0}, {"name": "oauth:mallory"}):
        response = httpx.post(server.url + KEYS, headers=bearer(admin), json=body)
        assert_openai_error(response, 400, "invalid_request_error")
    assert_openai_error(httpx.delete(f"{server.url}{KEYS}/not-an-id", headers=bearer(admin)), 400,
                        "invalid_request_error")
