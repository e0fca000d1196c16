//! Golden scripts of the tuner's decisions, in the manner of toydb's test scripts: each file in
//! `tests/tune_scripts/` is a list of commands, each followed by the output it must produce
//! (lines starting with `> `). `UPDATE_GOLDEN=1 cargo test --workspace --test integration tune::`
//! rewrites the expected output after a deliberate change; review the diff.
//!
//! Commands:
//! - `arm NAME asha|median [eta=N] rungs=S,S lr=X,X [wd=X,X] [confirm=N,N]`: an arm and its
//!   grid trials, added in the order given (the sweep's order is middle point first);
//! - `report NAME LR STEP LOSS`: the grid trial of arm NAME at learning rate LR reported LOSS
//!   at STEP; a stop verdict ends the trial as the server does;
//! - `finish NAME LR LOSS`, `fail NAME LR`, `cancel NAME LR`: the grid trial ended;
//! - `restart`: a new tuner rebuilt from the decisions taken so far and the trials' ends, as a
//!   coordinator restart rebuilds it from the store.

use std::collections::BTreeMap;
use std::path::Path;

use coordinator::scheduler::tune::{ArmDecision, Ended, RungDecision, Tuner, Verdict};
use experiments::trial::*;

fn base_config() -> TrialConfig {
    TrialConfig {
        name: String::new(),
        method: Method::Freeze { top: 1 },
        base: Base::HfDir {
            path: "/models/base".into(),
        },
        data: DataSpec {
            train: CorpusSpec {
                paths: vec!["/tmp/x.txt".into()],
                package: None,
                documents: DocSplit::File,
            },
            valid: None,
            valid_fraction: 0.1,
            context: 32,
            max_train_tokens: None,
            max_valid_windows: None,
        },
        train: TrainSpec {
            steps: 100,
            batch_size: 2,
            grad_accum: 1,
            lr: 1e-3,
            lr_factor: None,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip_norm: None,
            eval_every: 10,
            eval_windows: 1,
            checkpoint_every: 0,
            ranks: 1,
        },
        groups: 2,
        seed: 0,
        tune: None,
    }
}

/// The script's world: the tuner plus what a store would hold.
struct World {
    tuner: Tuner,
    /// (arm, lr label) → (id, config), in the order added.
    trials: Vec<((String, String), String, TrialConfig)>,
    rung_log: Vec<RungDecision>,
    arms_done: Vec<String>,
    ends: Vec<(String, Ended)>,
    names: BTreeMap<String, String>,
}

impl World {
    fn id(&self, arm: &str, lr: &str) -> Result<String, String> {
        self.trials
            .iter()
            .find(|((a, l), _, _)| a == arm && l == lr)
            .map(|(_, id, _)| id.clone())
            .ok_or_else(|| format!("no grid trial {arm} lr={lr}"))
    }

    fn end(&mut self, id: &str, how: Ended, out: &mut Vec<String>) {
        self.ends.push((id.to_string(), how));
        if let Some(d) = self.tuner.ended(id, how) {
            self.arm_decided(&d, out);
        }
    }

    fn arm_decided(&mut self, d: &ArmDecision, out: &mut Vec<String>) {
        self.arms_done.push(d.arm_key.clone());
        let best = d
            .best
            .as_ref()
            .map_or("none".to_string(), |b| self.names[b].clone());
        out.push(format!("arm {} decided: best {best}; {}", d.arm, d.detail));
        for c in &d.confirm {
            out.push(format!(
                "  confirm {} (lr {:e}, seed {})",
                c.name, c.train.lr, c.seed
            ));
        }
    }

    fn run(&mut self, line: &str) -> Result<Vec<String>, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut out = Vec::new();
        match words.as_slice() {
            ["arm", name, strategy, rest @ ..] => {
                let mut kv = BTreeMap::new();
                for w in rest {
                    let (k, v) = w.split_once('=').ok_or(format!("`{w}` is not key=value"))?;
                    kv.insert(k, v);
                }
                let list = |k: &str| -> Vec<String> {
                    kv.get(k)
                        .map(|v| v.split(',').map(str::to_string).collect())
                        .unwrap_or_default()
                };
                let strategy = match *strategy {
                    "asha" => TuneStrategy::Asha {
                        reduction_factor: kv
                            .get("eta")
                            .map_or(Ok(3), |v| v.parse())
                            .map_err(|e| format!("{e}"))?,
                    },
                    "median" => TuneStrategy::Median,
                    s => return Err(format!("unknown strategy {s}")),
                };
                let lrs = list("lr");
                let num = |v: &str| v.parse::<f64>().map_err(|e| format!("{v}: {e}"));
                let tag = TuneTag {
                    arm: name.to_string(),
                    role: TuneRole::Tune,
                    strategy,
                    rungs: list("rungs")
                        .iter()
                        .map(|s| s.parse().map_err(|e| format!("{s}: {e}")))
                        .collect::<Result<_, _>>()?,
                    lr: lrs.iter().map(|v| num(v)).collect::<Result<_, _>>()?,
                    weight_decay: Vec::new(),
                    confirm_seeds: {
                        let s = list("confirm");
                        if s.is_empty() {
                            vec![0]
                        } else {
                            s.iter()
                                .map(|v| v.parse().map_err(|e| format!("{v}: {e}")))
                                .collect::<Result<_, _>>()?
                        }
                    },
                };
                for lr in &lrs {
                    let mut c = base_config();
                    c.train.lr = num(lr)?;
                    c.name = format!("{name} lr={lr}");
                    c.seed = tag.confirm_seeds[0];
                    c.tune = Some(tag.clone());
                    let id = c.id();
                    self.tuner.add(&id, &c);
                    self.names.insert(id.clone(), c.name.clone());
                    self.trials.push(((name.to_string(), lr.clone()), id, c));
                }
            }
            ["report", arm, lr, step, loss] => {
                let id = self.id(arm, lr)?;
                let step: u64 = step.parse().map_err(|e| format!("{e}"))?;
                let loss: f64 = loss.parse().map_err(|e| format!("{e}"))?;
                match self.tuner.rung_report(&id, step, loss) {
                    None => out.push("no decision".to_string()),
                    Some(d) => {
                        out.push(format!(
                            "{} rung {} (step {}) loss {:.4}: {} ({})",
                            self.names[&id],
                            d.rung,
                            d.step,
                            d.loss,
                            d.verdict.as_str(),
                            d.detail
                        ));
                        self.rung_log.push(d.clone());
                        if d.verdict == Verdict::Stop {
                            self.end(&id, Ended::Out, &mut out);
                        }
                    }
                }
            }
            ["finish", arm, lr, loss] => {
                let id = self.id(arm, lr)?;
                let valid_loss: f64 = loss.parse().map_err(|e| format!("{e}"))?;
                self.end(&id, Ended::Finished { valid_loss }, &mut out);
            }
            ["fail", arm, lr] => {
                let id = self.id(arm, lr)?;
                self.end(&id, Ended::Out, &mut out);
            }
            ["cancel", arm, lr] => {
                let id = self.id(arm, lr)?;
                self.end(&id, Ended::Cancelled, &mut out);
            }
            ["restart"] => {
                let mut t = Tuner::new();
                for (_, id, c) in &self.trials {
                    t.add(id, c);
                }
                for d in &self.rung_log {
                    t.restore_rung(d);
                }
                for k in &self.arms_done {
                    t.restore_arm(k);
                }
                for (id, how) in self.ends.clone() {
                    if let Some(d) = t.ended(&id, how) {
                        out.push("(decided again after the restart!)".to_string());
                        self.arm_decided(&d, &mut out);
                    }
                }
                self.tuner = t;
                out.push("restarted".to_string());
            }
            _ => return Err(format!("unknown command `{line}`")),
        }
        Ok(out)
    }
}

fn run_script(path: &Path) -> (String, String) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut world = World {
        tuner: Tuner::new(),
        trials: Vec::new(),
        rung_log: Vec::new(),
        arms_done: Vec::new(),
        ends: Vec::new(),
        names: BTreeMap::new(),
    };
    let mut produced = String::new();
    for line in text.lines() {
        if line.starts_with("> ") || line == ">" {
            continue;
        }
        produced.push_str(line);
        produced.push('\n');
        let cmd = line.trim();
        if cmd.is_empty() || cmd.starts_with('#') {
            continue;
        }
        let out = world
            .run(cmd)
            .unwrap_or_else(|e| panic!("{}: {cmd}: {e}", path.display()));
        for o in out {
            produced.push_str("> ");
            produced.push_str(&o);
            produced.push('\n');
        }
    }
    (text, produced)
}

#[test]
fn golden_scripts_of_the_tuners_decisions() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tune_scripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "scripts missing in {}", dir.display());
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failed = Vec::new();
    for f in &files {
        let (expected, produced) = run_script(f);
        if expected != produced {
            if update {
                std::fs::write(f, &produced).unwrap();
            } else {
                failed.push(format!(
                    "{}: output differs\n--- expected\n{expected}\n--- produced\n{produced}",
                    f.display()
                ));
            }
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
