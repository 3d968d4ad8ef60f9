"""What a run reports (:mod:`distqat.monitor.summary`): replica reports through JSON, the
job's summary from them and from the history, and ``summary.json`` on disk."""

import json
import time
from dataclasses import asdict
from statistics import fmean

import pytest

from distqat.monitor.summary import (LAST_WINDOW, SUMMARY_FILE, SUMMARY_KEYS, ReplicaReport,
                                     Summary, last_window, read_summary, summarize,
                                     write_summary)
from distqat.plan import Member, make_plan

PLAN = make_plan([Member(rank=r, host=f"h{r // 2}") for r in range(5)], 2)  # 2 x 2, 1 spare


def reports():
    r0 = ReplicaReport(replica=0, inner_steps_done=24, outer_steps_done=2,
                       losses=[4.0 - 0.1 * i for i in range(24)], samples=24 * 64,
                       train_seconds=4.0, bytes_allreduced=1000, activation_bytes=300,
                       gradient_bytes=200,
                       evals=[{"outer_step": 0, "loss": 3.0, "accuracy": 0.1},
                              {"outer_step": 1, "loss": 2.0, "accuracy": 0.5}],
                       loss_after_outer={1: 2.9, 2: 1.7})
    r1 = ReplicaReport(replica=1, inner_steps_done=20, outer_steps_done=1,
                       losses=[5.0 - 0.2 * i for i in range(20)], samples=20 * 64,
                       train_seconds=8.0, bytes_allreduced=900, activation_bytes=310,
                       gradient_bytes=210)
    return [r0, r1]


def summary_of(reps, *, inner_steps=12, history=None, started=None):
    return summarize(run_id="job1", mode="pipeline", experiment_prefix="tiny", plan=PLAN,
                     inner_steps=inner_steps, reports=reps, exit_reason="completed",
                     started=time.time() - 5 if started is None else started,
                     history=history)


# ------------------------------------------------------------------ replica reports


def test_replica_report_json_round_trip_gives_int_step_keys_back():
    r0 = reports()[0]
    text = r0.to_json()
    assert json.loads(text)["loss_after_outer"] == {"1": 2.9, "2": 1.7}  # JSON: strings
    back = ReplicaReport.from_json(text)
    assert back == r0
    assert list(back.loss_after_outer) == [1, 2]  # ints again, as history looks them up
    assert back.loss_after_outer.get(2) == 1.7
    assert ReplicaReport.from_json(ReplicaReport(replica=3).to_json()) == ReplicaReport(3)


def test_replica_report_from_json_ignores_keys_it_does_not_know():
    data = json.loads(reports()[1].to_json())
    data["added_by_a_newer_version"] = 1
    assert ReplicaReport.from_json(json.dumps(data)) == reports()[1]


def test_public_report_leaves_per_step_figures_out():
    public = reports()[0].public()
    assert "losses" not in public and "loss_after_outer" not in public
    assert public["replica"] == 0 and public["samples"] == 24 * 64
    assert public["evals"] == reports()[0].evals


# ------------------------------------------------------------------ the summary


def test_summarize_aggregates_the_replicas():
    r0, r1 = reports()
    started = time.time() - 5
    s = summary_of([r0, r1], inner_steps=12, started=started)
    assert (s.run_id, s.mode, s.experiment_prefix, s.exit_reason) \
        == ("job1", "pipeline", "tiny", "completed")
    assert (s.world_size, s.num_stages, s.num_replicas) == (5, 2, 2)
    assert s.plan == str(PLAN)
    # progress is that of the slowest replica
    assert s.inner_steps_done == 20 and s.outer_steps_done == 1
    # no history: the mean of the replicas' first losses
    assert s.loss_first == pytest.approx(fmean([4.0, 5.0]))
    # the mean over replicas of the mean of the last min(inner_steps, 10) = 10 losses
    assert last_window(12) == LAST_WINDOW == 10
    want = fmean([fmean(r0.losses[-10:]), fmean(r1.losses[-10:])])
    assert s.loss_last == pytest.approx(want)
    # rates add up: each replica's samples over its own training time
    assert s.samples_per_s == pytest.approx(24 * 64 / 4.0 + 20 * 64 / 8.0)
    assert s.train_seconds == 8.0
    assert (s.bytes_allreduced, s.activation_bytes, s.gradient_bytes) == (1900, 610, 410)
    assert s.eval_first == {"outer_step": 0, "loss": 3.0, "accuracy": 0.1}
    assert s.eval_last == {"outer_step": 1, "loss": 2.0, "accuracy": 0.5}
    assert 5 <= s.wall_seconds < 60
    assert s.replicas == [r0.public(), r1.public()]
    assert (s.restarts, s.recoveries, s.rounds) == (0, [], [])


@pytest.mark.parametrize("inner_steps, window", [(1, 1), (3, 3), (10, 10), (500, 10)])
def test_loss_last_window_follows_inner_steps(inner_steps, window):
    r0, r1 = reports()
    s = summary_of([r0, r1], inner_steps=inner_steps)
    assert last_window(inner_steps) == window
    assert s.loss_last == pytest.approx(fmean([fmean(r0.losses[-window:]),
                                               fmean(r1.losses[-window:])]))


def test_history_gives_loss_first_restarts_recoveries_and_rounds():
    hist = {"loss_first": 7.5, "loss_last": 0.5, "restarts": 2,
            "recoveries": [{"seconds": 3.0, "steps_lost": 4}],
            "rounds": [{"started": 1.0}, {"started": 2.0}, {"started": 3.0}]}
    s = summary_of(reports(), history=hist)
    assert s.loss_first == 7.5  # the job's first loss, not this round's
    assert s.loss_last != 0.5   # the reports have losses: they win
    assert (s.restarts, s.recoveries, s.rounds) == (2, hist["recoveries"], hist["rounds"])
    # a history without a first loss yet: back to the reports
    s = summary_of(reports(), history=dict(hist, loss_first=None))
    assert s.loss_first == pytest.approx(4.5)


def test_missing_reports():
    r0, r1 = reports()
    only1 = summary_of([r1])  # replica 0's report never arrived
    assert only1.inner_steps_done == 20 and only1.loss_first == 5.0
    assert only1.samples_per_s == pytest.approx(20 * 64 / 8.0)
    assert only1.eval_first is None and only1.eval_last is None
    assert only1.replicas == [r1.public()]
    # a report without losses or training time (it never trained) adds nothing but
    # its progress, and no division by zero
    idle = ReplicaReport(replica=1)
    s = summary_of([r0, idle])
    assert s.loss_first == 4.0 and s.inner_steps_done == 0
    assert s.samples_per_s == pytest.approx(24 * 64 / 4.0)
    # no report at all: a round cut short before any outer step
    none = summary_of([], history={"loss_first": 3.0, "loss_last": 1.25, "restarts": 1})
    assert (none.inner_steps_done, none.outer_steps_done) == (0, 0)
    assert none.loss_first == 3.0 and none.loss_last == 1.25  # the history's
    assert none.samples_per_s == 0 and none.train_seconds == 0.0
    assert none.eval_first is None and none.replicas == [] and none.restarts == 1
    empty = summary_of([])
    assert empty.loss_first is None and empty.loss_last is None


# ------------------------------------------------------------------ summary.json


def test_summary_file_round_trip_and_keys(tmp_path):
    s = summary_of(reports(), history={"restarts": 1, "rounds": [{"started": 1.0}]})
    data = asdict(s)
    assert set(SUMMARY_KEYS) <= set(data)
    assert all(data[k] is not None for k in SUMMARY_KEYS)
    assert read_summary(tmp_path) is None
    path = write_summary(tmp_path, data)
    assert path == tmp_path / SUMMARY_FILE
    assert [p.name for p in tmp_path.iterdir()] == [SUMMARY_FILE]  # no temp file left
    back = read_summary(tmp_path)
    assert back == json.loads(json.dumps(data))
    assert Summary(**back) == s  # every field survives the trip
    write_summary(tmp_path, dict(data, exit_reason="interrupted"))  # replaced whole
    assert read_summary(tmp_path)["exit_reason"] == "interrupted"
