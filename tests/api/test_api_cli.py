"""`slimgpt keys create/revoke` and `slimgpt db upgrade/downgrade`."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.cli import build_parser, main
from app.core.config import get_settings


def test_cli_parser_has_the_service_commands():
    p = build_parser()
    assert p.parse_args(["serve", "--port", "9000"]).port == 9000
    assert p.parse_args(["db", "upgrade"]).revision == "head"
    assert p.parse_args(["db", "downgrade"]).revision == "base"
    assert p.parse_args(["keys", "create", "--tenant", "acme"]).tenant == "acme"
    assert p.parse_args(["keys", "revoke", "abc"]).key_id == "abc"


def test_keys_create_prints_a_working_key_and_revoke_disables_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLIMGPT_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("SLIMGPT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SLIMGPT_BROKER_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["db", "upgrade"]) == 0
        assert main(["keys", "create", "--tenant", "acme"]) == 0
        captured = capsys.readouterr()
        key = captured.out.strip().splitlines()[-1]
        key_id = key.split("_")[1]
        from app.main import create_app

        app = create_app(get_settings().model_copy(update={"embedded_worker": ""}))
        with TestClient(app) as c:
            h = {"Authorization": f"Bearer {key}"}
            assert c.get("/v1/jobs", headers=h).status_code == 200
            assert main(["keys", "revoke", key_id]) == 0
            assert c.get("/v1/jobs", headers=h).status_code == 401
        assert main(["keys", "revoke", "nope"]) == 1
        assert main(["db", "downgrade"]) == 0
    finally:
        get_settings.cache_clear()
