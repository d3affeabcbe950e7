"""The crud contract the worker relies on (app.crud.jobs), on SQLite and Postgres."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from app.crud import jobs as crud
from app.db.base import utcnow
from app.db.models import Job


def test_claim_sets_running_and_counts_the_attempt(submit, db):
    job = submit()
    with db() as s:
        claimed = crud.claim_job(s, job["id"], "w1", 60)
        assert claimed is not None and claimed.state == "running" and claimed.attempts == 1
        assert claimed.lease_owner == "w1" and claimed.started_at is not None


def test_claim_refuses_a_live_lease_of_another_worker(submit, db):
    job = submit()
    with db() as s:
        assert crud.claim_job(s, job["id"], "w1", 60) is not None
        assert crud.claim_job(s, job["id"], "w2", 60) is None


def test_claim_by_the_same_worker_succeeds_again(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        again = crud.claim_job(s, job["id"], "w1", 60)
        assert again is not None and again.attempts == 2


def test_claim_takes_over_an_expired_lease(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        row = s.get(Job, job["id"])
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.commit()
        taken = crud.claim_job(s, job["id"], "w2", 60)
        assert taken is not None and taken.lease_owner == "w2" and taken.attempts == 2
        assert job["id"] not in crud.expired_running_jobs(s)


def test_claim_refuses_terminal_and_unknown_jobs(submit, db):
    job = submit()
    with db() as s:
        crud.finish_job(s, job["id"], "cancelled")
        assert crud.claim_job(s, job["id"], "w1", 60) is None
        assert crud.claim_job(s, "00000000-0000-0000-0000-000000000000", "w1", 60) is None


def test_concurrent_claims_have_exactly_one_winner(submit, db):
    job = submit()
    winners: list[str] = []
    barrier = threading.Barrier(6)

    def go(i: int) -> None:
        barrier.wait()
        with db() as s:
            if crud.claim_job(s, job["id"], f"w{i}", 60) is not None:
                winners.append(f"w{i}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(winners) == 1


def test_renew_lease_only_for_the_owner(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 1)
        assert crud.renew_lease(s, job["id"], "w1", 120)
        assert not crud.renew_lease(s, job["id"], "w2", 120)
        assert s.get(Job, job["id"]).lease_expires_at > utcnow() + timedelta(seconds=60)


def test_add_event_numbers_events_and_updates_progress(submit, db):
    job = submit()
    with db() as s:
        ev = crud.add_event(s, job["id"], phase="pruning", message="layer 2", layer=2,
                            num_layers=10, percent=25.0, eta_s=9.0, metrics={"err": 0.1})
        assert ev.seq == 2  # 1 is "job accepted"
        row = crud.get_job(s, job["id"])
        assert (row.phase, row.layer, row.num_layers, row.percent, row.eta_s) == (
            "pruning", 2, 10, 25.0, 9.0)


def test_concurrent_add_event_gets_unique_sequence_numbers(submit, db):
    job = submit()
    barrier = threading.Barrier(5)

    def go(i: int) -> None:
        barrier.wait()
        with db() as s:
            for k in range(4):
                crud.add_event(s, job["id"], phase="pruning", message=f"{i}-{k}")

    threads = [threading.Thread(target=go, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with db() as s:
        seqs = [e.seq for e in crud.list_events(s, job["id"])]
    assert seqs == list(range(1, 22))


def test_add_event_for_unknown_job_raises(db):
    with db() as s, pytest.raises(LookupError):
        crud.add_event(s, "00000000-0000-0000-0000-000000000000", phase="x", message="y")


def test_update_progress_leaves_unset_fields(submit, db):
    job = submit()
    with db() as s:
        crud.update_progress(s, job["id"], phase="loading", num_layers=30)
        crud.update_progress(s, job["id"], percent=5.0)
        row = crud.get_job(s, job["id"])
        assert (row.phase, row.num_layers, row.percent) == ("loading", 30, 5.0)


def test_finish_job_never_overwrites_a_terminal_job(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        crud.finish_job(s, job["id"], "succeeded", result={"ok": True})
        again = crud.finish_job(s, job["id"], "failed", error="late")
        assert again.state == "succeeded" and again.error is None and again.result == {"ok": True}
        assert again.lease_owner is None


def test_finish_job_rejects_a_non_terminal_state(submit, db):
    job = submit()
    with db() as s, pytest.raises(ValueError):
        crud.finish_job(s, job["id"], "running")


def test_finish_job_merges_metrics(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        crud.add_event(s, job["id"], phase="evaluating", message="ppl")
        s.get(Job, job["id"]).metrics = {"params_before": 10}
        s.commit()
        done = crud.finish_job(s, job["id"], "succeeded", metrics={"params_after": 8})
        assert done.metrics == {"params_before": 10, "params_after": 8}


def test_requeue_returns_a_running_job_to_the_queue(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        row = crud.requeue_job(s, job["id"], max_attempts=3)
        assert row.state == "queued" and row.lease_owner is None


def test_requeue_fails_a_job_out_of_attempts(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        row = crud.requeue_job(s, job["id"], max_attempts=1)
        assert row.state == "failed" and "attempts" in row.error


def test_add_artifact_names_files_relative_to_the_job_folder(submit, db, settings, client, tenant):
    job = submit()
    folder = settings.artifacts_dir / job["id"] / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"a": 1}')
    with db() as s:
        a = crud.add_artifact(s, job["id"], folder / "config.json", 8, "ab" * 32)
        assert a.name == "model/config.json"
        crud.add_artifact(s, job["id"], folder / "config.json", 8, "cd" * 32)  # rewrite: update
    listed = client.get(f"/v1/jobs/{job['id']}/artifacts", headers=tenant.headers).json()
    assert [(i["name"], i["sha256"]) for i in listed["items"]] == [("model/config.json", "cd" * 32)]
    r = client.get(listed["items"][0]["download_url"], headers=tenant.headers)
    assert r.status_code == 200 and r.content == b'{"a": 1}'


def test_download_of_unknown_artifact_is_404(submit, client, tenant):
    job = submit()
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/../../etc/passwd", headers=tenant.headers)
    assert r.status_code == 404


def test_artifact_outside_the_artifacts_dir_is_not_served(submit, db, client, tenant, tmp_path):
    job = submit()
    outside = tmp_path / "secret.txt"
    outside.write_text("no")
    with db() as s:
        crud.add_artifact(s, job["id"], outside, 2, "0" * 64, name="secret.txt")
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/secret.txt", headers=tenant.headers)
    assert r.status_code == 404
