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


def test_claim_leaves_an_expired_lease_to_the_sweeper(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        row = s.get(Job, job["id"])
        row.lease_expires_at = utcnow() - timedelta(seconds=1)
        s.commit()
        taken, why = crud.try_claim(s, job["id"], "w2", 60)
        assert taken is None and "w1" in why
        assert job["id"] in crud.expired_running_jobs(s)


def test_claim_waits_out_the_retry_backoff(submit, db):
    job = submit()
    with db() as s:
        row = s.get(Job, job["id"])
        row.available_at = utcnow() + timedelta(seconds=30)
        s.commit()
        taken, why = crud.try_claim(s, job["id"], "w1", 60)
        assert taken is None and "backoff" in why
        row = s.get(Job, job["id"])
        row.available_at = utcnow() - timedelta(seconds=1)
        s.commit()
        assert crud.claim_job(s, job["id"], "w1", 60) is not None


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


def test_a_lost_worker_requeues_the_job_after_a_backoff_and_counts_the_loss(submit, db,
                                                                           settings):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "gpu-3:41:ab", 60)
        crud.add_event(s, job["id"], phase="pruning", message="layer 17", layer=17,
                       num_layers=30)
        before = utcnow()
        row = crud.record_worker_lost(s, job["id"], settings, reason="lease expired")
        assert row.state == "queued" and row.lease_owner is None and row.lost_count == 1
        assert row.last_worker == "gpu-3:41:ab"
        assert row.last_error == "lease expired; at layer 17 of 30 on host gpu-3"
        base = settings.retry_backoff_base_s
        assert before + timedelta(seconds=base / 2) <= row.available_at
        assert row.available_at <= utcnow() + timedelta(seconds=base)
        assert row.next_dispatch_at == row.available_at
        assert "retrying in" in crud.list_events(s, job["id"])[-1].message


def test_a_job_whose_worker_was_lost_max_attempts_times_fails_saying_so(submit, db, settings):
    job = submit()
    with db() as s:
        for i in range(settings.job_max_attempts):
            row = s.get(Job, job["id"])
            row.available_at = None
            s.commit()
            assert crud.claim_job(s, job["id"], f"gpu-{i}:1:x", 60) is not None
            crud.add_event(s, job["id"], phase="pruning", message="layer", layer=i + 4,
                           num_layers=30)
            row = crud.record_worker_lost(s, job["id"], settings, reason="lease expired")
        assert row.state == "failed"
        assert row.error == (f"worker lost {settings.job_max_attempts} times; last at layer "
                             f"{settings.job_max_attempts + 3} of 30 on host "
                             f"gpu-{settings.job_max_attempts - 1} (lease expired)")


def test_a_lost_report_for_another_workers_lease_changes_nothing(submit, db, settings):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "hostA:200:x", 60)
        assert crud.record_worker_lost(s, job["id"], settings, reason="died",
                                       owner_prefix="hostA:100:") is None
        assert crud.record_worker_lost(s, job["id"], settings, reason="lease expired",
                                       expired_only=True) is None
        assert s.get(Job, job["id"]).state == "running"


def test_hand_back_queues_the_job_at_once_without_counting_a_loss(submit, db):
    job = submit()
    with db() as s:
        crud.claim_job(s, job["id"], "w1", 60)
        assert not crud.hand_back(s, job["id"], "w2", reason="shutting down")
        assert crud.hand_back(s, job["id"], "w1", reason="shutting down")
        row = s.get(Job, job["id"])
        assert row.state == "queued" and row.lost_count == 0 and row.available_at is None
        assert crud.claim_job(s, job["id"], "w2", 60) is not None


def test_retry_delays_grow_exponentially_with_jitter_up_to_the_maximum(settings):
    import random

    s = settings.model_copy(update={"retry_backoff_base_s": 10.0, "retry_backoff_max_s": 60.0})
    rng = random.Random(0)
    for losses, ceiling in [(1, 10), (2, 20), (3, 40), (4, 60), (9, 60)]:
        delays = [crud.retry_delay_s(losses, s, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant


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
