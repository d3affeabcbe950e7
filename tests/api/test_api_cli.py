"""`slimgpt keys create/revoke` and `slimgpt db upgrade/downgrade`."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from app.cli import command, main
from app.core.config import get_settings


def test_cli_has_the_service_commands():
    root = command()
    assert {"serve", "db", "keys", "worker", "dispatcher", "prune", "demo"} <= set(root.commands)
    assert set(root.commands["db"].commands) == {"upgrade", "downgrade"}
    assert set(root.commands["keys"].commands) == {"create", "revoke", "list"}
    serve = {p.name: p.default for p in root.commands["serve"].params}
    assert serve == {"host": "127.0.0.1", "port": 8000}


def test_keys_create_prints_a_working_key_and_revoke_disables_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMGPT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SLIMGPT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SLIMGPT_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["keys", "create", "--tenant", "acme", "--name", "ci"]) == 0
        captured = capsys.readouterr()
        key = captured.out.strip().splitlines()[-1]
        key_id = key.split("_")[1]
        assert main(["keys", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(k["id"], k["tenant"], k["name"], k["revoked_at"]) for k in listed] == [
            (key_id, "acme", "ci", None)]
        assert key not in json.dumps(listed)  # never the secret
        from app.main import create_app

        app = create_app(get_settings().model_copy(update={"embedded_worker": ""}))
        with TestClient(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            assert c.get("/v1/jobs", headers=h).status_code == 200
            assert main(["keys", "revoke", key_id]) == 0
            assert c.get("/v1/jobs", headers=h).status_code == 401
        assert main(["keys", "revoke", "nope"]) == 1
        assert main(["keys", "list", "--tenant", "acme"]) == 0
        assert "acme" in capsys.readouterr().out
        assert main(["db", "downgrade"]) == 0
    finally:
        get_settings.cache_clear()
