"""The API process never imports torch (the API image carries none)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_app_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "import app, app.main, app.cli, app.dispatch, app.crud.jobs, app.db.migrate\n"
        "from app.core.config import Settings\n"
        f"a = app.main.create_app(Settings(data_dir={str(tmp_path)!r}, auth_disabled=True))\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(a) as c:\n"
        "    r = c.post('/v1/estimate', json={'config': {'num_hidden_layers': 2, 'hidden_size': 64,"
        " 'num_attention_heads': 4, 'intermediate_size': 128, 'vocab_size': 100},"
        " 'target_ratio': 0.2})\n"
        "    assert r.status_code == 200, r.text\n"
        "app.cli.command()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
