//! The tuner: which grid trials of a tuned arm (`[tune]` in a sweep) go on at a rung, which stop,
//! and, once every grid trial of an arm has ended, which setting won and which confirm runs it
//! gets.
//!
//! Like the [`Scheduler`](crate::scheduler::Scheduler), it is a pure state machine: no socket,
//! file or clock. The server feeds it the validation losses workers report at rung steps and the
//! ends of trials, persists every decision it returns before acting on it, and rebuilds it after
//! a restart from those decisions ([`Tuner::restore_rung`], [`Tuner::restore_arm`]). A decision
//! is a function of what the tuner has seen when it is taken, and it is final:
//!
//! - a trial's decision at a rung is taken when it first reports that rung. A later report of the
//!   same rung (an attempt restarted after a worker died mid-rung) changes nothing, and a report
//!   from another trial never reopens a decision already taken;
//! - ASHA (asynchronous successive halving): the trial goes on when its loss ranks within the top
//!   `max(1, ⌊n / η⌋)` of the `n` losses recorded at the rung so far, itself included (ties go to
//!   the earlier grid point), so the first trial at a rung always goes on;
//! - median stopping: the trial stops when its loss is worse than the median of the other
//!   trials' losses at that rung (it goes on when it is the first there);
//! - an arm is decided when each of its grid points has finished, stopped, failed or been
//!   cancelled: the finished grid trial with the lowest final validation loss wins (ties: the
//!   earlier grid point), and the arm gets one confirm trial per confirm seed after the first (the
//!   winning grid trial, which ran with the first seed, is that seed's confirmation). An arm with
//!   a cancelled grid trial gets none: the user stopped it.

use std::collections::BTreeMap;

use experiments::trial::{TrialConfig, TuneRole, TuneStrategy, TuneTag};

/// Whether a trial goes on past a rung.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Continue,
    Stop,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Continue => "continue",
            Verdict::Stop => "stop",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        match s {
            "continue" => Some(Verdict::Continue),
            "stop" => Some(Verdict::Stop),
            _ => None,
        }
    }
}

/// The tuner's decision about one trial at one rung.
#[derive(Clone, Debug, PartialEq)]
pub struct RungDecision {
    pub trial_id: String,
    /// Index into the arm's rungs.
    pub rung: usize,
    pub step: u64,
    pub loss: f64,
    pub verdict: Verdict,
    /// For people: how the loss ranked and what the rule asked.
    pub detail: String,
}

/// The tuner's decision about an arm whose grid trials have all ended.
#[derive(Clone, Debug, PartialEq)]
pub struct ArmDecision {
    pub arm_key: String,
    pub arm: String,
    /// The winning grid trial; None when none of them finished.
    pub best: Option<String>,
    /// Confirm trials to add: the winner's setting at each confirm seed after the first.
    pub confirm: Vec<TrialConfig>,
    pub detail: String,
}

/// How a grid trial ended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Ended {
    Finished {
        valid_loss: f64,
    },
    /// Stopped by the tuner or failed for good: not a candidate.
    Out,
    /// Cancelled by the user: the arm gets no confirm runs.
    Cancelled,
}

#[derive(Clone, Debug)]
struct Point {
    config: TrialConfig,
    ended: Option<Ended>,
    /// The rung of a stop decision, if any.
    stopped_at: Option<usize>,
}

#[derive(Clone, Debug)]
struct Arm {
    name: String,
    tag: TuneTag,
    /// Grid trials in the order they were added (the sweep's grid order), by id.
    order: Vec<String>,
    points: BTreeMap<String, Point>,
    /// Per rung, the (trial, loss) recorded, in the order the decisions were taken.
    rungs: Vec<Vec<(String, f64)>>,
    /// Per rung, the trials decided there.
    decided: BTreeMap<(String, usize), Verdict>,
    done: bool,
}

impl Arm {
    fn grid_points(&self) -> usize {
        self.tag.lr.len() * self.tag.weight_decay.len().max(1)
    }

    fn index(&self, id: &str) -> usize {
        self.order
            .iter()
            .position(|x| x == id)
            .unwrap_or(usize::MAX)
    }
}

/// The tuning state of every tuned arm the coordinator knows.
#[derive(Clone, Debug, Default)]
pub struct Tuner {
    arms: BTreeMap<String, Arm>,
    arm_of: BTreeMap<String, String>,
}

impl Tuner {
    pub fn new() -> Self {
        Tuner::default()
    }

    /// Take note of a submitted trial. Only grid trials (`role = tune`) matter to the tuner;
    /// others are ignored.
    pub fn add(&mut self, id: &str, config: &TrialConfig) {
        let Some(tag) = config.tune.as_ref().filter(|t| t.role == TuneRole::Tune) else {
            return;
        };
        let Some(key) = config.arm_key() else { return };
        if self.arm_of.contains_key(id) {
            return;
        }
        let arm = self.arms.entry(key.clone()).or_insert_with(|| Arm {
            name: tag.arm.clone(),
            tag: tag.clone(),
            order: Vec::new(),
            points: BTreeMap::new(),
            rungs: vec![Vec::new(); tag.rungs.len()],
            decided: BTreeMap::new(),
            done: false,
        });
        arm.order.push(id.to_string());
        arm.points.insert(
            id.to_string(),
            Point {
                config: config.clone(),
                ended: None,
                stopped_at: None,
            },
        );
        self.arm_of.insert(id.to_string(), key);
    }

    /// Whether `id` is a grid trial the tuner decides about.
    pub fn knows(&self, id: &str) -> bool {
        self.arm_of.contains_key(id)
    }

    /// A validation loss a grid trial reported at `step`. Returns the decision when `step` is one
    /// of its arm's rungs and the trial has no decision there yet; None otherwise.
    pub fn rung_report(&mut self, id: &str, step: u64, loss: f64) -> Option<RungDecision> {
        let key = self.arm_of.get(id)?;
        let arm = self.arms.get_mut(key)?;
        let rung = arm.tag.rungs.iter().position(|&r| r == step)?;
        let point = arm.points.get(id)?;
        if point.ended.is_some() || point.stopped_at.is_some() {
            return None;
        }
        if arm.decided.contains_key(&(id.to_string(), rung)) {
            return None;
        }
        let me = arm.index(id);
        let seen = &arm.rungs[rung];
        let (verdict, detail) = if !loss.is_finite() {
            (Verdict::Stop, "the loss is not finite".to_string())
        } else {
            match arm.tag.strategy {
                TuneStrategy::Asha { reduction_factor } => {
                    let n = seen.len() + 1;
                    let keep = (n / reduction_factor as usize).max(1);
                    let better = seen
                        .iter()
                        .filter(|(other, l)| {
                            l.total_cmp(&loss)
                                .then_with(|| arm.index(other).cmp(&me))
                                .is_lt()
                        })
                        .count();
                    let rank = better + 1;
                    let verdict = if rank <= keep {
                        Verdict::Continue
                    } else {
                        Verdict::Stop
                    };
                    (
                        verdict,
                        format!("rank {rank} of {n} at this rung; asha with η = {reduction_factor} keeps the top {keep}"),
                    )
                }
                TuneStrategy::Median => {
                    if seen.is_empty() {
                        (Verdict::Continue, "the first loss at this rung".to_string())
                    } else {
                        let mut others: Vec<f64> = seen.iter().map(|(_, l)| *l).collect();
                        others.sort_by(f64::total_cmp);
                        let m = others.len();
                        let median = if m % 2 == 1 {
                            others[m / 2]
                        } else {
                            (others[m / 2 - 1] + others[m / 2]) / 2.0
                        };
                        let verdict = if loss > median {
                            Verdict::Stop
                        } else {
                            Verdict::Continue
                        };
                        (
                            verdict,
                            format!(
                                "the median of {m} other loss{} at this rung is {median:.4}",
                                if m == 1 { "" } else { "es" }
                            ),
                        )
                    }
                }
            }
        };
        let d = RungDecision {
            trial_id: id.to_string(),
            rung,
            step,
            loss,
            verdict,
            detail,
        };
        self.restore_rung(&d);
        Some(d)
    }

    /// Put back a decision taken before (read from the store after a restart), or record one
    /// just taken.
    pub fn restore_rung(&mut self, d: &RungDecision) {
        let Some(arm) = self
            .arm_of
            .get(&d.trial_id)
            .and_then(|k| self.arms.get_mut(k))
        else {
            return;
        };
        if d.rung >= arm.rungs.len() || arm.decided.contains_key(&(d.trial_id.clone(), d.rung)) {
            return;
        }
        arm.rungs[d.rung].push((d.trial_id.clone(), d.loss));
        arm.decided.insert((d.trial_id.clone(), d.rung), d.verdict);
        if d.verdict == Verdict::Stop {
            if let Some(p) = arm.points.get_mut(&d.trial_id) {
                p.stopped_at = Some(d.rung);
            }
        }
    }

    /// Mark an arm decided before a restart: ending its trials again decides nothing.
    pub fn restore_arm(&mut self, arm_key: &str) {
        if let Some(arm) = self.arms.get_mut(arm_key) {
            arm.done = true;
        }
    }

    /// A grid trial ended. Returns the arm's decision when this was the last of its grid trials.
    pub fn ended(&mut self, id: &str, how: Ended) -> Option<ArmDecision> {
        let key = self.arm_of.get(id)?.clone();
        let arm = self.arms.get_mut(&key)?;
        let point = arm.points.get_mut(id)?;
        if point.ended.is_none() {
            point.ended = Some(how);
        }
        if arm.done
            || arm.points.len() < arm.grid_points()
            || arm.points.values().any(|p| p.ended.is_none())
        {
            return None;
        }
        arm.done = true;
        if arm
            .points
            .values()
            .any(|p| p.ended == Some(Ended::Cancelled))
        {
            return Some(ArmDecision {
                arm_key: key,
                arm: arm.name.clone(),
                best: None,
                confirm: Vec::new(),
                detail: "a grid trial was cancelled: nothing to confirm".to_string(),
            });
        }
        let best = arm
            .order
            .iter()
            .filter_map(|id| match arm.points[id].ended {
                Some(Ended::Finished { valid_loss }) if valid_loss.is_finite() => {
                    Some((id, valid_loss))
                }
                _ => None,
            })
            .min_by(|a, b| {
                a.1.total_cmp(&b.1)
                    .then_with(|| arm.index(a.0).cmp(&arm.index(b.0)))
            });
        let Some((best_id, best_loss)) = best else {
            return Some(ArmDecision {
                arm_key: key,
                arm: arm.name.clone(),
                best: None,
                confirm: Vec::new(),
                detail: "no grid trial finished: nothing to confirm".to_string(),
            });
        };
        let winner = &arm.points[best_id].config;
        let confirm: Vec<TrialConfig> = arm
            .tag
            .confirm_seeds
            .iter()
            .skip(1)
            .map(|&seed| {
                let mut c = winner.clone();
                c.seed = seed;
                c.name = format!("{} seed={seed}", winner.name);
                if let Some(t) = c.tune.as_mut() {
                    t.role = TuneRole::Confirm;
                }
                c
            })
            .collect();
        let stopped = arm
            .points
            .values()
            .filter(|p| p.stopped_at.is_some())
            .count();
        Some(ArmDecision {
            arm_key: key,
            arm: arm.name.clone(),
            best: Some(best_id.clone()),
            detail: format!(
                "{} wins with final validation loss {best_loss:.4} ({stopped} of {} grid trials stopped early); {} confirm run{}",
                winner.name,
                arm.points.len(),
                confirm.len(),
                if confirm.len() == 1 { "" } else { "s" },
            ),
            confirm,
        })
    }
}
