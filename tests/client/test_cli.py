"""The `slimgpt` client commands (main([...])) against a live server with a fake runner."""

from __future__ import annotations

import json
import textwrap

import pytest

from app.cli import main
from app.client_cli import EXIT_API, EXIT_JOB_FAILED, EXIT_OK, EXIT_USAGE, load_batch

from .conftest import ARTIFACTS, free_port


@pytest.fixture
def cli(live_server, api_key, capsys):
    """Run `slimgpt ...` against the live server; returns (exit code, stdout, stderr)."""

    def run(*argv: str, key: str | None = api_key) -> tuple[int, str, str]:
        conn = ["--url", live_server.url] + (["--api-key", key] if key else [])
        # After the subcommand (a group's options come after its own subcommand's name).
        n = 2 if argv[0] in ("files", "hub-token") else 1
        code = main([*argv[:n], *conn, *argv[n:]])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_submit_wait_success_prints_the_result_and_exits_0(cli):
    code, out, err = cli("submit", "--model", "test/ok", "--ratio", "0.2", "--wait",
                         "--poll", "0.02")
    assert code == EXIT_OK, err
    assert "submitted job" in err and "pruning" in err  # progress lines on stderr
    assert "state      succeeded" in out
    assert "134.5M->107.6M" in out and "20.50->27.25" in out


def test_submit_wait_failure_exits_1_with_the_error(cli):
    code, out, _err = cli("submit", "--model", "test/fail", "--ratio", "0.2", "--wait",
                         "--poll", "0.02")
    assert code == EXIT_JOB_FAILED
    assert "state      failed" in out and "fake failure: out of memory" in out


def test_submit_json_output_is_the_job(cli):
    code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.3",
                         "--schedule", "linear", "--profile", "hetero", "--wait", "--poll", "0.02")
    job = json.loads(out)
    assert code == EXIT_OK and job["state"] == "succeeded"
    assert job["request"]["schedule"] == "linear" and job["request"]["target_ratio"] == 0.3
    assert err == ""  # --json: nothing but the JSON, no progress noise

    code, out, _ = cli("submit", "--json", "--model", "test/fail", "--ratio", "0.2")
    assert code == EXIT_OK and json.loads(out)["model_id"] == "test/fail"  # no --wait: exit 0


def test_submit_uploads_the_calibration_file(cli, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "hello world"}\n' * 10)
    code, out, _err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2",
                         "--calib", str(calib))
    job = json.loads(out)
    assert code == EXIT_OK
    assert len(job["request"]["calibration"]["source"]) == 36  # the uploaded file's id


def test_status_list_and_cancel(cli, live_server):
    _, key = live_server.new_key()
    code, out, _ = cli("submit", "--json", "--model", "test/slow", "--ratio", "0.2", key=key)
    job_id = json.loads(out)["id"]
    code, out, _ = cli("status", job_id, "--json", key=key)
    assert code == EXIT_OK and json.loads(out)["id"] == job_id
    code, out, _ = cli("list", key=key)
    assert code == EXIT_OK and job_id in out and "test/slow" in out
    code, out, _ = cli("list", "--state", "succeeded", "--json", key=key)
    assert json.loads(out) == []
    code, out, _ = cli("cancel", job_id, key=key)
    assert code == EXIT_OK and job_id in out
    code, out, _ = cli("logs", job_id, "--follow", key=key)
    assert code == EXIT_JOB_FAILED  # the followed job ended cancelled
    assert "cancel requested" in out and out.strip().splitlines()[-1].split()[2] == "cancelled"
    code, out, _ = cli("status", job_id, key=key)
    assert "state      cancelled" in out
    code, _, _err = cli("cancel", job_id, key=key)  # already cancelled: a no-op
    assert code == EXIT_OK


def test_logs_follow_and_resume_with_since(cli):
    code, out, _ = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2")
    job_id = json.loads(out)["id"]
    code, out, _ = cli("logs", job_id, "--follow", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_OK
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)) and events[-1]["state"] == "succeeded"
    code, out, _ = cli("logs", job_id, "--follow", "--since", "3", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == seqs[3:]
    code, out, _ = cli("logs", job_id, "--since", "3")  # no --follow: what exists, plain text
    assert code == EXIT_OK and len(out.splitlines()) == len(seqs) - 3
    assert "layer 1/3 pruned" in out


def test_download_writes_every_artifact(cli, tmp_path):
    code, out, _ = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2", "--wait",
                       "--poll", "0.02")
    job_id = json.loads(out)["id"]
    code, out, _err = cli("download", job_id, str(tmp_path / "model"))
    assert code == EXIT_OK and f"downloaded {len(ARTIFACTS)} files" in out
    for name, data in ARTIFACTS.items():
        assert (tmp_path / "model" / name).read_bytes() == data
    code, out, _ = cli("download", job_id, str(tmp_path / "again"), "--json")
    assert len(json.loads(out)["files"]) == len(ARTIFACTS)


BATCH = """\
concurrency: 1
defaults:
  schedule: log
  calibration: {num_samples: 8, seq_len: 64}
matrix:
  models: [test/ok, test/fail]
  ratios: [0.2, 0.3]
jobs:
  - model_id: test/ok
    target_ratio: 0.25
    export: {profile: uniform}
    schedule: uniform
"""


def test_batch_respects_the_concurrency_limit_and_summarizes(cli, live_server, tmp_path):
    tenant_id, key = live_server.new_key()
    path = tmp_path / "batch.yaml"
    path.write_text(BATCH)
    code, out, _err = cli("batch", str(path), "--concurrency", "2", "--poll", "0.02", "--json",
                         key=key)
    summary = json.loads(out)
    assert code == EXIT_JOB_FAILED  # two of the five jobs fail
    assert summary["counts"] == {"succeeded": 3, "failed": 2}
    assert summary["concurrency"] == 2 and summary["max_active"] == 2
    # The server saw at most two of this tenant's jobs queued or running at any submission.
    seen = live_server.worker.active_at_enqueue[tenant_id]
    assert len(seen) == 5 and max(seen) == 2
    jobs = summary["jobs"]
    assert [(j["model_id"], j["target_ratio"]) for j in jobs] == [
        ("test/ok", 0.2), ("test/ok", 0.3), ("test/fail", 0.2), ("test/fail", 0.3),
        ("test/ok", 0.25)]
    assert jobs[0]["metrics"]["params_after"] == 107_612_006
    assert "fake failure" in jobs[2]["error"]


def test_batch_human_summary_table_and_all_succeeded_exit_0(cli, live_server, tmp_path):
    tenant_id, key = live_server.new_key()
    path = tmp_path / "batch.yaml"
    path.write_text("matrix: {models: [test/ok], ratios: [0.1, 0.2]}\n")
    code, out, err = cli("batch", str(path), "--poll", "0.02", key=key)
    assert code == EXIT_OK, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["model", "ratio", "state", "job"]
    assert sum("succeeded" in line for line in lines[2:4]) == 2
    assert "134.5M->107.6M" in lines[2]
    assert "2 jobs: 2 succeeded" in out
    assert "submitted" in err
    assert max(live_server.worker.active_at_enqueue[tenant_id]) <= 2  # default concurrency


def test_batch_file_schema_and_placeholders(tmp_path):
    calib = tmp_path / "c.txt"
    calib.write_text("text")
    path = tmp_path / "b.yaml"
    path.write_text(textwrap.dedent("""\
        defaults:
          calib_file: c.txt
          destination: {hub_repo_id: "org/{model}-slim{ratio_pct}"}
        matrix: {models: [HuggingFaceTB/SmolLM2-135M], ratios: [0.2]}
        """))
    items, concurrency = load_batch(path)
    assert concurrency is None and len(items) == 1
    assert items[0]["body"]["destination"]["hub_repo_id"] == "org/SmolLM2-135M-slim20"
    assert items[0]["calib_file"] == str(calib.resolve())


@pytest.mark.parametrize("content, message", [
    ("- a\n- b\n", "expected a mapping"),
    ("jobs: [{model_id: a/b}]\n", "target_ratio: Field required"),
    ("matrix: {models: [a/b], ratios: [1.5]}\n", "target_ratio"),
    ("jobs: [{model_id: a/b, target_ratio: 0.2, colour: red}]\n", "colour"),
    ("defaults: {schedule: log}\n", "no jobs"),
    ("matrix: {models: [a/b]}\n", "exactly `models` and `ratios`"),
    ("jobs: [{model_id: a/b, target_ratio: 0.2, calib_file: nope.txt}]\n", "does not exist"),
    ("jobs: [{model_id: a/b, target_ratio: 0.2\n", "not valid YAML"),
])
def test_batch_bad_input_exits_2_before_submitting(cli, tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, out, err = cli("batch", str(path))
    assert code == EXIT_USAGE, err
    assert message in err and out == ""


def test_bad_arguments_exit_2(cli, capsys):
    for argv in (["submit", "--model", "a/b", "--ratio", "1.5"],
                 ["submit", "--model", "a/b"],
                 ["batch", "f.yaml", "--concurrency", "0"],
                 ["list", "--state", "sleeping"],
                 ["submit", "--model", "a/b", "--ratio", "0.2", "--set", "novalue"],
                 ["frobnicate"]):
        assert main(argv) == EXIT_USAGE, argv
        assert capsys.readouterr().err
    code, _, err = cli("submit", "--model", "not a repo!", "--ratio", "0.2")
    assert code == EXIT_USAGE and "model_id" in err
    code, _, err = cli("submit", "--model", "a/b", "--ratio", "0.2", "--schedule", "fast")
    assert code == EXIT_USAGE and "--schedule" in err
    code, _, err = cli("submit", "--model", "a/b", "--ratio", "0.2", "--calib", "/nope.txt")
    assert code == EXIT_USAGE and "no such file" in err
    # valid locally, rejected by the server (no such uploaded file): also a usage error
    code, _, err = cli("submit", "--model", "test/ok", "--ratio", "0.2", "--calib-source",
                       "00000000-0000-0000-0000-000000000000")
    assert code == EXIT_USAGE and "no uploaded file" in err


def test_unreachable_server_unknown_job_and_bad_key_exit_3(cli, capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", dead, "00000000-0000-0000-0000-000000000000"]) == EXIT_API
    assert "cannot reach the SlimGPT API" in capsys.readouterr().err
    monkeypatch.setenv("SLIMGPT_URL", dead)  # the environment variable is honoured too
    assert main(["list"]) == EXIT_API
    capsys.readouterr()
    code, _, err = cli("status", "00000000-0000-0000-0000-000000000000")
    assert code == EXIT_API and "404" in err
    code, _, err = cli("list", key="sgk_bad_key")
    assert code == EXIT_API and "401" in err


def test_api_key_from_env_and_from_the_embedded_data_dir(live_server, api_key, capsys,
                                                         monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMGPT_URL", live_server.url)
    monkeypatch.setenv("SLIMGPT_API_KEY", api_key)
    assert main(["list", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []
    monkeypatch.delenv("SLIMGPT_API_KEY")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text(api_key + "\n")
    monkeypatch.setenv("SLIMGPT_DATA_DIR", str(tmp_path / "data"))
    assert main(["list", "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []
    # global options before the subcommand work as well
    monkeypatch.delenv("SLIMGPT_URL")
    assert main(["--url", live_server.url, "--json", "list"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == []


def test_help_documents_exit_codes(capsys):
    assert main(["submit", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "exit codes" in out and "API or connection error" in out
    assert main(["batch", "--help"]) == EXIT_OK
    assert "matrix:" in capsys.readouterr().out


def test_submit_body_file_flags_and_set_compose_in_that_order(cli, tmp_path):
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"model_id": "test/ok", "target_ratio": 0.5,
                                "pruning": {"percdamp": 0.2, "min_group": 32}}))
    code, out, err = cli("submit", "--json", "--body", str(body), "--ratio", "0.3",
                         "--gqa-policy", "group", "--private", "--set", "pruning.percdamp=0.05",
                         "--set", "calibration.source=wikitext2", "--set", "revision=v1.0")
    assert code == EXIT_OK, err
    req = json.loads(out)["request"]
    assert req["target_ratio"] == 0.3  # a flag beats the body file
    assert req["pruning"] == {**req["pruning"], "percdamp": 0.05, "min_group": 32,
                              "gqa_policy": "group"}  # --set beats both
    assert req["calibration"]["source"] == "wikitext2" and req["revision"] == "v1.0"
    assert req["destination"]["private"] is True


def test_submit_preset_flag_reaches_the_request(cli):
    code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.3",
                         "--preset", "quality")
    assert code == EXIT_OK, err
    assert json.loads(out)["request"]["pruning"]["preset"] == "quality"


def test_submit_shares_flag_names_with_prune():
    from app.cli import command

    commands = command().commands
    prune = {o for p in commands["prune"].params for o in p.opts}
    submit = {o for p in commands["submit"].params for o in p.opts}
    local_only = {"--out", "--batch-size", "--device", "--dtype", "--offload-activations",
                  "--checkpoint-dir", "--no-verify", "--stream", "--dry-run", "--host-memory-gb",
                  # algorithm options the service picks itself (its defaults are the measured best)
                  "--target", "--local-search", "--allocation", "--expert-min-tokens",
                  "--selection", "--fisher-windows", "--fisher-samples", "--calib-budget",
                  "--search-generations"}
    assert prune - local_only <= submit, sorted(prune - local_only - submit)


def test_submit_eval_file_is_uploaded_once_and_reused(cli, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("held-out text\n" * 20)
    ids = set()
    for _ in range(2):
        code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2",
                             "--eval", str(text), "--eval-windows", "4")
        assert code == EXIT_OK, err
        ids.add(json.loads(out)["request"]["evaluate"]["eval_source"])
    assert len(ids) == 1  # same content: the earlier upload is reused


def test_batch_rerun_resumes_with_the_same_jobs(cli, live_server, tmp_path):
    _, key = live_server.new_key()
    calib = tmp_path / "c.txt"
    calib.write_text("calibration text " * 40)
    path = tmp_path / "batch.yaml"
    path.write_text("defaults: {calib_file: c.txt}\n"
                    "matrix: {models: [test/ok], ratios: [0.1, 0.2]}\n")
    code, out, _ = cli("batch", str(path), "--poll", "0.02", "--json", key=key)
    first = json.loads(out)
    assert code == EXIT_OK and first["resumed"] == 0
    code, out, err = cli("batch", str(path), "--poll", "0.02", "--json", key=key)
    again = json.loads(out)
    assert code == EXIT_OK, err
    assert [j["job_id"] for j in again["jobs"]] == [j["job_id"] for j in first["jobs"]]
    assert again["resumed"] == 2
    code, out, _ = cli("list", "--json", key=key)
    assert len(json.loads(out)) == 2  # nothing submitted twice
    code, out, _ = cli("files", "list", "--json", key=key)
    assert len(json.loads(out)) == 1  # nor uploaded twice
    # An edited row is a new job, the unchanged one is resumed.
    path.write_text("defaults: {calib_file: c.txt}\n"
                    "matrix: {models: [test/ok], ratios: [0.1, 0.25]}\n")
    code, out, _ = cli("batch", str(path), "--poll", "0.02", "--json", key=key)
    third = json.loads(out)
    assert third["jobs"][0]["job_id"] == first["jobs"][0]["job_id"]
    assert third["jobs"][1]["job_id"] not in {j["job_id"] for j in first["jobs"]}


def test_estimate_artifacts_files_and_hub_token_commands(cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4,
                                  "hidden_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "intermediate_size": 128,
                                  "vocab_size": 100}))
    code, out, err = cli("estimate", "--config", str(config), "--ratio", "0.2", "--json",
                         "--set", "schedule=linear")
    assert code == EXIT_OK, err
    plan = json.loads(out)
    assert plan["total_params_after"] < plan["total_params_before"]
    assert plan["schedule"] == "linear"
    code, out, _ = cli("estimate", "--config", str(config), "--ratio", "0.2")
    assert code == EXIT_OK and "parameters:" in out

    code, out, _ = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2", "--wait",
                       "--poll", "0.02")
    job_id = json.loads(out)["id"]
    code, out, _ = cli("artifacts", job_id, "--json")
    assert sorted(a["name"] for a in json.loads(out)) == sorted(ARTIFACTS)
    code, out, _ = cli("download", job_id, str(tmp_path / "one"), "--name", "config.json")
    assert code == EXIT_OK and [p.name for p in (tmp_path / "one").iterdir()] == ["config.json"]

    upload = tmp_path / "u.jsonl"
    upload.write_text('{"text": "a"}\n')
    code, out, _ = cli("files", "upload", str(upload))
    file_id = out.strip()
    code, out, _ = cli("files", "show", file_id, "--json")
    assert json.loads(out)["filename"] == "u.jsonl"

    code, out, _ = cli("hub-token", "status")
    assert out.strip() == "not configured"
    code, out, _ = cli("hub-token", "set", "--token", "hf_" + "y" * 30)
    assert code == EXIT_OK and "hf_" not in out
    code, out, _ = cli("hub-token", "status", "--json")
    assert json.loads(out)["configured"] is True
    assert cli("hub-token", "delete")[0] == EXIT_OK

    code, out, _ = cli("ready", "--json")
    assert code == EXIT_OK and json.loads(out)["status"] == "ready"


def test_version_and_shell_completion(capsys, monkeypatch):
    from app import __version__

    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"slimgpt {__version__}"
    # What the script `slimgpt --install-completion` installs asks: complete "slimgpt hub-t".
    # Not `--show-completion bash`: that option is a flag that ignores "bash" and detects the
    # shell from the process ancestry (shellingham), so the outcome depended on what launched
    # pytest (nearest shell dash: "Shell dash not supported", exit 1).
    monkeypatch.setenv("_SLIMGPT_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "slimgpt hub-t")
    monkeypatch.setenv("COMP_CWORD", "1")
    assert main([]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["hub-token"]
    monkeypatch.setenv("COMP_WORDS", "slimgpt submit --gqa")
    monkeypatch.setenv("COMP_CWORD", "2")
    assert main([]) == EXIT_OK
    assert "--gqa-policy" in capsys.readouterr().out.split()


def test_a_missing_extra_is_named_not_a_traceback(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "celery", None)  # what an install without it looks like
    assert main(["worker"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "needs the `worker` extra" in err and "pip install 'slimgpt-service[worker]'" in err
    assert "Traceback" not in err


def test_submit_gpus_becomes_the_jobs_resources(cli):
    code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2",
                         "--gpus", "1")
    assert code == EXIT_OK, err
    assert json.loads(out)["request"]["resources"] == {"gpus": 1, "min_gpu_memory_gb": None}


def test_submit_asking_for_more_gpus_than_any_worker_has_says_why(cli):
    code, _out, err = cli("submit", "--model", "test/ok", "--ratio", "0.2", "--gpus", "2")
    assert code != EXIT_OK
    assert "fewer than 2 GPUs" in err


def test_submit_heal_flags_become_the_jobs_heal(cli):
    code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2", "--heal")
    assert code == EXIT_OK, err
    assert json.loads(out)["request"]["heal"] == {"tokens": 1_000_000, "mode": "lora"}
    code, out, err = cli("submit", "--json", "--model", "test/ok", "--ratio", "0.2",
                         "--heal-tokens", "50000", "--heal-mode", "full")
    assert code == EXIT_OK, err
    assert json.loads(out)["request"]["heal"] == {"tokens": 50_000, "mode": "full"}
