//! The scheduler's rules, driven with explicit times and no gRPC.

use coordinator::scheduler::*;

const TTL: i64 = 1_000;

fn spec(id: &str, cost: f64, dep: Option<&str>) -> TrialSpec {
    TrialSpec {
        id: id.into(),
        depends_on: dep.map(str::to_string),
        cost,
        ranks: 1,
    }
}

fn sched_with(trials: &[TrialSpec]) -> Scheduler {
    let mut s = Scheduler::new(TTL, 3);
    for t in trials {
        s.submit(t.clone());
    }
    s.register_worker("w1", "h1");
    s.register_worker("w2", "h1");
    s
}

fn lease(s: &mut Scheduler, w: &str, now: i64) -> Option<Grant> {
    s.lease(w, now).unwrap().0
}

fn transient(reason: &str) -> Failure {
    Failure {
        reason: reason.into(),
        message: "boom".into(),
        deterministic: false,
        preempted: false,
    }
}

#[test]
fn longest_expected_trial_is_leased_first() {
    let mut s = sched_with(&[
        spec("a", 10.0, None),
        spec("b", 30.0, None),
        spec("c", 20.0, None),
    ]);
    let order: Vec<String> = (0..3)
        .map(|_| lease(&mut s, "w1", 0).unwrap().trial_id)
        .collect();
    assert_eq!(order, ["b", "c", "a"]);
    assert!(lease(&mut s, "w1", 0).is_none());
}

#[test]
fn unknown_worker_is_refused() {
    let mut s = sched_with(&[spec("a", 1.0, None)]);
    assert_eq!(
        s.lease("nobody", 0).unwrap_err(),
        SchedError::UnknownWorker("nobody".into())
    );
    assert!(s.heartbeat("nobody", &[], 0).is_err());
}

#[test]
fn expired_lease_requeues_with_next_attempt_and_stale_messages_are_ignored() {
    let mut s = sched_with(&[spec("a", 1.0, None)]);
    let g = lease(&mut s, "w1", 0).unwrap();
    assert_eq!((g.attempt, g.deadline_ms), (1, TTL));
    // Heartbeats renew the deadline.
    let hb = s.heartbeat("w1", &[("a".into(), 1)], 900).unwrap();
    assert_eq!(hb.renewed, vec![("a".to_string(), 1, 900 + TTL)]);
    assert!(s.tick(1_500).is_empty(), "renewed lease must not expire");
    // No heartbeat: lost at its deadline.
    let ds = s.tick(1_900);
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Expired,
            attempt: 1,
            ..
        }
    )));
    assert_eq!(s.state("a"), Some(TrialState::Queued));
    let g2 = lease(&mut s, "w2", 2_000).unwrap();
    assert_eq!(g2.attempt, 2);
    // The first worker wakes up: its messages about attempt 1 change nothing.
    assert!(!s.report("a", 1));
    assert!(s.complete("a", 1, "{}".into()).is_empty());
    assert!(s.fail("a", 1, transient("io")).is_empty());
    let hb = s.heartbeat("w1", &[("a".into(), 1)], 2_100).unwrap();
    assert_eq!(hb.cancel, vec![("a".to_string(), 1)]);
    assert!(hb.renewed.is_empty());
    // A worker can't renew someone else's attempt either.
    assert_eq!(
        s.heartbeat("w1", &[("a".into(), 2)], 2_100)
            .unwrap()
            .cancel
            .len(),
        1
    );
    assert!(s.report("a", 2));
    let ds = s.complete("a", 2, "{\"perplexity\":3}".into());
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            metrics_json: Some(_),
            ..
        }
    )));
    assert_eq!(s.state("a"), Some(TrialState::Finished));
    assert!(
        s.complete("a", 2, "{}".into()).is_empty(),
        "second completion is stale"
    );
}

#[test]
fn deterministic_failures_are_final_and_transient_ones_spend_a_bounded_budget() {
    let mut s = sched_with(&[spec("det", 2.0, None), spec("flaky", 1.0, None)]);
    let g = lease(&mut s, "w1", 0).unwrap();
    assert_eq!(g.trial_id, "det");
    let f = Failure {
        reason: "diverged".into(),
        message: "nan".into(),
        deterministic: true,
        preempted: false,
    };
    s.fail("det", 1, f);
    assert_eq!(s.state("det"), Some(TrialState::Failed));

    for attempt in 1..=3 {
        let g = lease(&mut s, "w1", 0).expect("flaky is retried");
        assert_eq!((g.trial_id.as_str(), g.attempt), ("flaky", attempt));
        let ds = s.fail("flaky", attempt, transient("io"));
        let last = ds.last().unwrap();
        if attempt < 3 {
            assert!(
                matches!(last, Decision::State { state: TrialState::Queued, spent, .. } if *spent == attempt)
            );
        } else {
            assert!(
                matches!(last, Decision::State { state: TrialState::Failed, reason, .. } if reason == "io")
            );
        }
    }
    assert!(lease(&mut s, "w1", 0).is_none());
}

#[test]
fn preempted_attempts_spend_no_budget() {
    let mut s = sched_with(&[spec("a", 1.0, None)]);
    for attempt in 1..=10 {
        let g = lease(&mut s, "w1", 0).unwrap();
        assert_eq!(g.attempt, attempt);
        let f = Failure {
            reason: "stopped".into(),
            message: "SIGTERM".into(),
            deterministic: false,
            preempted: true,
        };
        s.fail("a", attempt, f);
        assert_eq!(s.state("a"), Some(TrialState::Queued));
    }
}

#[test]
fn dependants_wait_for_their_base_and_fail_when_it_fails() {
    // The dependant is costlier but must wait for its base.
    let mut s = sched_with(&[
        spec("ft", 100.0, Some("pre")),
        spec("pre", 1.0, None),
        spec("ft2", 50.0, Some("pre2")),
        spec("pre2", 1.0, None),
    ]);
    assert_eq!(s.state("ft"), Some(TrialState::Waiting));
    let g = lease(&mut s, "w1", 0).unwrap();
    assert_eq!(g.trial_id, "pre");
    let g2 = lease(&mut s, "w2", 0).unwrap();
    assert_eq!(g2.trial_id, "pre2");
    assert!(lease(&mut s, "w1", 0).is_none(), "dependants wait");
    let ds = s.complete("pre", 1, "{}".into());
    assert!(ds.iter().any(|d| matches!(d, Decision::State { trial_id, state: TrialState::Queued, .. } if trial_id == "ft")));
    assert_eq!(lease(&mut s, "w1", 0).unwrap().trial_id, "ft");
    let f = Failure {
        reason: "bad_input".into(),
        message: "x".into(),
        deterministic: true,
        preempted: false,
    };
    s.fail("pre2", 1, f);
    assert_eq!(s.state("ft2"), Some(TrialState::Failed));
    // A dependant submitted after its base failed fails at once.
    let ds = s.submit(spec("ft3", 1.0, Some("pre2")));
    assert!(ds.iter().any(|d| matches!(d, Decision::State { state: TrialState::Failed, reason, .. } if reason == "dependency_failed")));
}

#[test]
fn cancel_stops_running_attempts_and_resubmit_requeues() {
    let mut s = sched_with(&[spec("a", 1.0, None), spec("b", 2.0, Some("a"))]);
    let g = lease(&mut s, "w1", 0).unwrap();
    let ds = s.cancel("a").unwrap();
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Cancelled,
            ..
        }
    )));
    assert_eq!(s.state("a"), Some(TrialState::Cancelled));
    assert_eq!(
        s.state("b"),
        Some(TrialState::Cancelled),
        "dependant of a cancelled base"
    );
    let hb = s
        .heartbeat("w1", &[(g.trial_id.clone(), g.attempt)], 10)
        .unwrap();
    assert_eq!(hb.cancel.len(), 1, "the worker is told to stop");
    assert!(
        s.cancel("a").unwrap().is_empty(),
        "cancelling twice is a no-op"
    );
    assert!(s.cancel("zzz").is_err());
    // Resubmitting an identical trial that already finished adds nothing; a cancelled one runs again.
    s.submit(spec("a", 1.0, None));
    assert_eq!(s.state("a"), Some(TrialState::Queued));
    assert_eq!(lease(&mut s, "w1", 20).unwrap().attempt, 2);
}

fn restored(
    id: &str,
    state: TrialState,
    attempts: u32,
    spent: u32,
    worker: Option<&str>,
) -> RestoredTrial {
    RestoredTrial {
        spec: spec(id, 1.0, None),
        state,
        attempts,
        spent,
        deterministic: false,
        worker_id: worker.map(str::to_string),
    }
}

#[test]
fn restore_keeps_leases_of_known_workers_for_one_ttl() {
    let mut dep = restored("dep", TrialState::Waiting, 0, 0, None);
    dep.spec.depends_on = Some("done".into());
    let trials = vec![
        restored("back", TrialState::Running, 1, 0, Some("w1")),
        restored("gone", TrialState::Running, 2, 1, Some("w1")),
        restored("orphan", TrialState::Running, 1, 0, Some("w9")),
        restored("done", TrialState::Finished, 1, 0, None),
        dep,
    ];
    let now = 10_000;
    let (mut s, ds) = Scheduler::restore(TTL, 3, trials, vec![("w1".into(), "h1".into())], now);
    // Only the attempt of a worker the store does not know is lost at once.
    let lost: Vec<&str> = ds
        .iter()
        .filter_map(|d| match d {
            Decision::Ended {
                trial_id,
                outcome: AttemptOutcome::Lost,
                ..
            } => Some(trial_id.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(lost, ["orphan"]);
    assert_eq!(s.state("orphan"), Some(TrialState::Queued));
    assert_eq!(s.state("back"), Some(TrialState::Running));
    assert_eq!(s.state("gone"), Some(TrialState::Running));
    assert_eq!(s.lease_of("back"), Some(("w1", now + TTL)));
    assert_eq!(
        s.state("dep"),
        Some(TrialState::Queued),
        "base already finished"
    );
    assert_eq!(s.state("done"), Some(TrialState::Finished));

    // The worker reconnects and heartbeats for "back" within the ttl: it carries on.
    let hb = s.heartbeat("w1", &[("back".into(), 1)], now + 500).unwrap();
    assert_eq!(hb.renewed, vec![("back".to_string(), 1, now + 500 + TTL)]);
    assert!(s.report("back", 1));
    // Nobody heartbeats for "gone": lost at the deadline, queued, no budget spent.
    let ds = s.tick(now + TTL);
    assert!(ds.iter().any(|d| matches!(d, Decision::Ended { trial_id, attempt: 2, outcome: AttemptOutcome::Lost, .. } if trial_id == "gone")));
    assert!(ds.iter().any(|d| matches!(d, Decision::State { trial_id, state: TrialState::Queued, spent: 1, .. } if trial_id == "gone")));
    assert_eq!(
        s.state("back"),
        Some(TrialState::Running),
        "renewed lease lives on"
    );
    // A late heartbeat for the lost attempt is told to stop.
    assert_eq!(
        s.heartbeat("w1", &[("gone".into(), 2)], now + TTL + 1)
            .unwrap()
            .cancel,
        vec![("gone".to_string(), 2)]
    );
    let mut got: Vec<(String, u32)> = Vec::new();
    while let Some(g) = lease(&mut s, "w1", now + TTL + 2) {
        got.push((g.trial_id, g.attempt));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("dep".to_string(), 1),
            ("gone".to_string(), 3),
            ("orphan".to_string(), 2)
        ]
    );
    // The carried-over attempt completes normally, exactly once.
    assert!(!s.complete("back", 1, "{}".into()).is_empty());
    assert!(s.complete("back", 1, "{}".into()).is_empty());
    assert_eq!(s.state("back"), Some(TrialState::Finished));
}

#[test]
fn a_renewed_restored_lease_expires_like_any_other() {
    let trials = vec![restored("t", TrialState::Running, 1, 0, Some("w1"))];
    let (mut s, _) = Scheduler::restore(TTL, 3, trials, vec![("w1".into(), "h1".into())], 0);
    s.heartbeat("w1", &[("t".into(), 1)], 100).unwrap();
    // After a heartbeat the lease is an ordinary one: expiry is a transient failure.
    let ds = s.tick(100 + TTL);
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Expired,
            ..
        }
    )));
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::State {
            state: TrialState::Queued,
            spent: 1,
            ..
        }
    )));
}

#[test]
fn next_deadline_follows_leases() {
    let mut s = sched_with(&[spec("a", 1.0, None)]);
    assert_eq!(s.next_deadline(), None);
    lease(&mut s, "w1", 5);
    assert_eq!(s.next_deadline(), Some(5 + TTL));
}

/// The scheduler keeps indexes (queue order, lease deadlines, dependants) beside its trials.
/// Drive it with a long random mix of every event and check after each one that what the
/// indexes answer (`queued`, `next_deadline`, which trial a lease picks) agrees with a scan of
/// the trials' own states and leases.
#[test]
fn indexes_agree_with_a_scan_under_random_events() {
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut s = Scheduler::new(TTL, 2);
    for w in ["w1", "w2", "w3"] {
        s.register_worker(w, "h1");
    }
    let mut ids: Vec<String> = Vec::new();
    let mut now = 0i64;
    for step in 0..4000 {
        now += next(300) as i64;
        let pick = |ids: &[String], r: u64| ids[r as usize % ids.len()].clone();
        match next(9) {
            0 | 1 => {
                let id = format!("t{}", ids.len());
                // Some trials start from an earlier one; costs collide on purpose.
                let dep = (!ids.is_empty() && next(3) == 0).then(|| pick(&ids, next(1000)));
                s.submit(spec(&id, cost_of(&id), dep.as_deref()));
                ids.push(id);
            }
            2 | 3 => {
                let w = ["w1", "w2", "w3"][next(3) as usize];
                // The trial the lease must pick: highest cost, then the earliest submitted.
                let expect = ids
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| s.state(id) == Some(TrialState::Queued))
                    .max_by(|(i, a), (j, b)| {
                        let ca = cost_of(a);
                        let cb = cost_of(b);
                        ca.total_cmp(&cb).then(j.cmp(i))
                    })
                    .map(|(_, id)| id.clone());
                let got = lease(&mut s, w, now).map(|g| g.trial_id);
                assert_eq!(got, expect, "step {step}: lease picked the wrong trial");
            }
            4 if !ids.is_empty() => {
                let id = pick(&ids, next(1000));
                if let Some(a) = s.attempts(&id) {
                    s.complete(&id, a, "{}".into());
                }
            }
            5 if !ids.is_empty() => {
                let id = pick(&ids, next(1000));
                if let Some(a) = s.attempts(&id) {
                    let mut f = transient("error");
                    f.deterministic = next(4) == 0;
                    f.preempted = next(4) == 0;
                    s.fail(&id, a, f);
                }
            }
            6 if !ids.is_empty() => {
                let id = pick(&ids, next(1000));
                s.cancel(&id).unwrap();
                if next(2) == 0 {
                    s.submit(spec(&id, cost_of(&id), None));
                }
            }
            7 => {
                let held: Vec<(String, u32)> = ids
                    .iter()
                    .filter(|id| s.lease_of(id).is_some_and(|(w, _)| w == "w1"))
                    .map(|id| (id.clone(), s.attempts(id).unwrap()))
                    .collect();
                s.heartbeat("w1", &held, now).unwrap();
            }
            _ => {
                s.tick(now);
            }
        }
        let queued = ids
            .iter()
            .filter(|id| s.state(id) == Some(TrialState::Queued))
            .count();
        assert_eq!(s.queued(), queued, "step {step}: queued count");
        let earliest = ids
            .iter()
            .filter_map(|id| s.lease_of(id).map(|l| l.1))
            .min();
        assert_eq!(s.next_deadline(), earliest, "step {step}: next deadline");
        for id in &ids {
            let st = s.state(id).unwrap();
            assert_eq!(
                s.lease_of(id).is_some(),
                st == TrialState::Running,
                "step {step}: {id} is {st:?} but its lease is {:?}",
                s.lease_of(id)
            );
        }
    }
    let ended = ids
        .iter()
        .filter(|id| s.state(id).unwrap().is_terminal())
        .count();
    assert!(
        ended > 50 && ids.len() > 500,
        "the mix exercised little: {ended} of {}",
        ids.len()
    );
}

/// Costs are derived from the id so the test can recompute them: t<n> costs (n * 7) % 5.
fn cost_of(id: &str) -> f64 {
    let n: u64 = id[1..].parse().unwrap();
    ((n * 7) % 5) as f64
}

// ---------------------------------------------------------------------------- gang leases

fn gang(id: &str, cost: f64, ranks: u32) -> TrialSpec {
    TrialSpec {
        ranks,
        ..spec(id, cost, None)
    }
}

/// Four workers on host A, two on host B.
fn two_hosts(trials: &[TrialSpec]) -> Scheduler {
    let mut s = Scheduler::new(TTL, 3);
    for t in trials {
        s.submit(t.clone());
    }
    for w in ["a1", "a2", "a3", "a4"] {
        s.register_worker(w, "A");
    }
    for w in ["b1", "b2"] {
        s.register_worker(w, "B");
    }
    s
}

#[test]
fn a_gang_forms_from_waiting_workers_of_one_host_all_or_nothing() {
    let mut s = two_hosts(&[gang("g", 10.0, 3), spec("small", 1.0, None)]);
    // Host B can never hold 3 ranks: its workers look past the gang and take the small trial.
    let g = lease(&mut s, "b1", 0).unwrap();
    assert_eq!((g.trial_id.as_str(), g.rank, g.world), ("small", 0, 1));
    // On host A, the first two callers wait (nothing is started: all or nothing).
    assert!(lease(&mut s, "a1", 0).is_none());
    assert!(lease(&mut s, "a2", 1).is_none());
    assert_eq!(s.state("g"), Some(TrialState::Queued));
    assert!(s.members("g").is_empty());
    // The third makes the gang: the whole attempt starts at once, ranks in order of asking
    // (the caller first, then the waiting workers by id).
    let (g3, ds) = s.lease("a3", 2).unwrap();
    let g3 = g3.unwrap();
    assert_eq!(
        (g3.trial_id.as_str(), g3.rank, g3.world, g3.attempt),
        ("g", 0, 3, 1)
    );
    assert_eq!(s.state("g"), Some(TrialState::Running));
    assert_eq!(s.members("g"), ["a3", "a1", "a2"]);
    assert!(ds.iter().any(|d| matches!(d,
        Decision::Started { worker_id, .. } if worker_id == "a3,a1,a2")));
    // The waiting members pick their grants up on their next call.
    assert!(s.has_pending("a1") && s.has_pending("a2"));
    let g1 = lease(&mut s, "a1", 3).unwrap();
    let g2 = lease(&mut s, "a2", 3).unwrap();
    assert_eq!((g1.rank, g2.rank), (1, 2));
    assert_eq!((g1.attempt, g2.attempt), (1, 1));
    // A fourth worker of host A gets nothing from this gang.
    assert!(lease(&mut s, "a4", 3).is_none());
}

#[test]
fn a_waiting_worker_does_not_take_smaller_work_that_would_starve_the_gang() {
    let mut s = two_hosts(&[gang("g", 10.0, 2), spec("small", 1.0, None)]);
    assert!(
        lease(&mut s, "a1", 0).is_none(),
        "a1 must hold out for the gang"
    );
    let g = lease(&mut s, "a2", 0).unwrap();
    assert_eq!(g.trial_id, "g");
    // With the gang running, the small trial is next in line for anyone.
    assert_eq!(lease(&mut s, "a3", 0).unwrap().trial_id, "small");
}

#[test]
fn workers_that_stopped_waiting_are_not_drafted() {
    let mut s = two_hosts(&[gang("g", 10.0, 2)]);
    assert!(lease(&mut s, "a1", 0).is_none());
    // a1's lease call ended (or it went away): it is no longer a candidate.
    s.not_waiting("a1");
    assert!(lease(&mut s, "a2", 1).is_none());
    // A candidate last seen longer than the ttl ago is not drafted either.
    assert!(lease(&mut s, "a3", 2 + TTL + 1).is_none());
    assert_eq!(s.state("g"), Some(TrialState::Queued));
    // Fresh callers are.
    assert_eq!(
        lease(&mut s, "a4", 2 + TTL + 1).unwrap().trial_id,
        "g",
        "a3 waited within the ttl"
    );
    assert_eq!(s.members("g"), ["a4", "a3"]);
}

fn started_gang(s: &mut Scheduler) -> (Grant, Grant) {
    assert!(lease(s, "a1", 0).is_none());
    let g0 = lease(s, "a2", 0).unwrap();
    let g1 = lease(s, "a1", 0).unwrap();
    assert_eq!((g0.rank, g1.rank), (0, 1));
    (g0, g1)
}

#[test]
fn one_member_failing_ends_the_attempt_for_every_member() {
    let mut s = two_hosts(&[gang("g", 10.0, 2)]);
    started_gang(&mut s);
    let ds = s.fail("g", 1, transient("worker_error"));
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Failed,
            ..
        }
    )));
    assert_eq!(s.state("g"), Some(TrialState::Queued));
    assert!(s.members("g").is_empty());
    // Both members are told to stop at their next heartbeat.
    for w in ["a1", "a2"] {
        let ans = s.heartbeat(w, &[("g".into(), 1)], 10).unwrap();
        assert_eq!(ans.cancel, vec![("g".to_string(), 1)], "{w}");
        assert!(ans.renewed.is_empty());
    }
    // The retry is a new gang with a new attempt number.
    assert!(lease(&mut s, "a3", 20).is_none());
    let g = lease(&mut s, "a4", 20).unwrap();
    assert_eq!((g.attempt, g.world), (2, 2));
}

#[test]
fn one_member_missing_its_heartbeat_loses_the_whole_gang() {
    let mut s = two_hosts(&[gang("g", 10.0, 2)]);
    started_gang(&mut s);
    // a2 (rank 0) heartbeats, a1 does not.
    let ans = s.heartbeat("a2", &[("g".into(), 1)], TTL / 2).unwrap();
    assert_eq!(ans.renewed.len(), 1);
    assert!(s.tick(TTL - 1).is_empty());
    let ds = s.tick(TTL);
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Expired,
            ..
        }
    )));
    assert_eq!(s.state("g"), Some(TrialState::Queued));
    let ans = s.heartbeat("a2", &[("g".into(), 1)], TTL + 1).unwrap();
    assert_eq!(ans.cancel.len(), 1, "rank 0 must be told to stop");
}

#[test]
fn a_gang_grant_not_picked_up_goes_with_a_cancel() {
    let mut s = two_hosts(&[gang("g", 10.0, 2)]);
    assert!(lease(&mut s, "a1", 0).is_none());
    assert!(lease(&mut s, "a2", 0).is_some());
    assert!(s.has_pending("a1"));
    s.cancel("g").unwrap();
    assert!(
        !s.has_pending("a1"),
        "a cancelled gang's grant must not be handed out"
    );
    assert!(lease(&mut s, "a1", 1).is_none());
}

#[test]
fn rendezvous_is_posted_by_rank_0_and_read_by_members_only() {
    let mut s = two_hosts(&[gang("g", 10.0, 2)]);
    started_gang(&mut s);
    assert_eq!(s.rendezvous("a1", "g", 1).unwrap(), None);
    // Only rank 0 (a2) may post; outsiders and stale attempts are refused.
    assert!(s.post_rendezvous("a1", "g", 1, b"x".to_vec()).is_err());
    assert!(s.post_rendezvous("a2", "g", 2, b"x".to_vec()).is_err());
    s.post_rendezvous("a2", "g", 1, b"tcp 127.0.0.1:5000".to_vec())
        .unwrap();
    assert_eq!(
        s.rendezvous("a1", "g", 1).unwrap(),
        Some(&b"tcp 127.0.0.1:5000"[..])
    );
    assert!(s.rendezvous("a3", "g", 1).is_err(), "not a member");
    // A new attempt starts without the old blob.
    s.fail("g", 1, transient("worker_error"));
    assert!(lease(&mut s, "a3", 5).is_none());
    lease(&mut s, "a4", 5).unwrap();
    assert_eq!(s.rendezvous("a3", "g", 2).unwrap(), None);
}

#[test]
fn a_gang_running_across_a_restart_is_lost_without_spending_budget() {
    let trials = vec![RestoredTrial {
        spec: gang("g", 10.0, 2),
        state: TrialState::Running,
        attempts: 1,
        spent: 0,
        deterministic: false,
        worker_id: Some("a1,a2".into()),
    }];
    let workers = vec![("a1".into(), "A".into()), ("a2".into(), "A".into())];
    let (s, ds) = Scheduler::restore(TTL, 3, trials, workers, 0);
    assert_eq!(s.state("g"), Some(TrialState::Queued));
    assert!(ds.iter().any(|d| matches!(
        d,
        Decision::Ended {
            outcome: AttemptOutcome::Lost,
            ..
        }
    )));
    assert!(ds
        .iter()
        .any(|d| matches!(d, Decision::State { spent: 0, .. })));
}

#[test]
fn wait_reasons_say_why_a_trial_does_not_run() {
    let mut s = Scheduler::new(TTL, 3);
    s.submit(spec("big", 30.0, None));
    s.submit(spec("small", 10.0, None));
    s.submit(spec("child", 5.0, Some("big")));
    s.submit(gang("quad", 1.0, 4));
    let ids = ["big", "small", "child", "quad"];
    let why = s.wait_reasons(ids, 0);
    assert_eq!(why["big"], "no worker has registered");
    assert_eq!(why["child"], "waits for its base trial big to finish");

    s.register_worker("w1", "h1");
    s.register_worker("w2", "h1");
    let why = s.wait_reasons(ids, 0);
    assert!(
        why["big"].starts_with("no worker is connected (2 registered"),
        "{why:?}"
    );
    // The largest host has 2 workers: a 4-rank gang cannot run anywhere, and says so.
    assert!(
        why["quad"].starts_with("needs 4 workers on one host"),
        "{why:?}"
    );

    // Both workers busy: the rest of the queue waits for one, in lease order.
    assert_eq!(lease(&mut s, "w1", 0).unwrap().trial_id, "big");
    assert_eq!(lease(&mut s, "w2", 0).unwrap().trial_id, "small");
    let why = s.wait_reasons(ids, 10);
    assert!(
        !why.contains_key("big") && !why.contains_key("small"),
        "running: {why:?}"
    );
    assert_eq!(why["child"], "waits for its base trial big to finish");

    // A transient failure re-queues the trial; its reason counts the retries spent. (w2, whose
    // attempt failed, is connected again only once it asks for work.)
    s.fail("small", 1, transient("io"));
    let why = s.wait_reasons(ids, 20);
    assert_eq!(
        why["small"],
        "all 1 connected worker is busy; #1 in the queue; retry after 1 transient failure (1 of 3 spent)",
    );
    // Past the ttl without a heartbeat or a lease call nobody is connected any more.
    let why = s.wait_reasons(ids, 20 + 2 * TTL);
    assert!(
        why["small"].starts_with("no worker is connected"),
        "{why:?}"
    );
}
