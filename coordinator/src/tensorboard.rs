//! TensorBoard event files for every trial: `<report dir>/tensorboard/<trial name>/`.
//!
//! Researchers already keep their curves in TensorBoard, so the report also writes what the
//! coordinator stored there: `train/loss`, `train/lr`, `train/tokens_per_s` per optimizer step,
//! `valid/loss` and `valid/perplexity` per evaluation, and the trial's resolved config as the
//! HParams plugin's `session_start_info` (the hyperparameters table of TensorBoard's HPARAMS tab).
//!
//! No maintained Rust crate writes this format without pulling in a second protobuf stack, and the
//! format is small: a TFRecord file (per record: u64 length, masked CRC-32C of the length, the
//! bytes, masked CRC-32C of the bytes) of serialised `tensorflow.Event` messages, the first one
//! carrying `file_version = "brain.Event:2"`. The messages below are hand-written prost structs
//! with the field numbers of tensorflow/core/util/event.proto, summary.proto and TensorBoard's
//! plugins/hparams/plugin_data.proto; coordinator/tests/tensorboard.rs reads the files back with
//! TensorBoard's own `EventAccumulator`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use experiments::trial::{Progress, TrialConfig};
use prost::Message;

use crate::report::{TrialEvents, TrialRecord};

/// `tensorflow.Event` (only the fields written here).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "EventWhat", tags = "3, 5")]
    pub what: Option<EventWhat>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EventWhat {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a scalar (`simple_value`) or, with no value, plugin metadata only.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "SummaryValueKind", tags = "2")]
    pub value: Option<SummaryValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum SummaryValueKind {
    /// TensorBoard's scalar type is a 32-bit float.
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// `tensorflow.SummaryMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorflow.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorboard.hparams.HParamsPluginData` with its `session_start_info` arm.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(message, optional, tag = "3")]
    pub session_start_info: Option<SessionStartInfo>,
}

/// `tensorboard.hparams.SessionStartInfo`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SessionStartInfo {
    #[prost(map = "string, message", tag = "1")]
    pub hparams: std::collections::HashMap<String, PbValue>,
    #[prost(string, tag = "4")]
    pub group_name: String,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

/// `google.protobuf.Value`, the scalar arms.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbValue {
    #[prost(oneof = "PbKind", tags = "2, 3, 4")]
    pub kind: Option<PbKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum PbKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    Str(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

/// The tag TensorBoard's HParams plugin looks for.
pub const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), byte-table driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC: a CRC stored next to the data it covers is rotated and offset so that
/// a CRC of data that itself contains CRCs stays well distributed.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8, as TensorFlow's crc32c::Mask.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked CRC of the length, the data, masked CRC of the data.
pub fn tfrecord(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// The scalars of one trial per step: (tag, value) pairs in tag order. A retried attempt replays
/// steps from its checkpoint; the latest value for a step and tag wins, as in `curves.csv`.
pub fn scalars_by_step(t: &TrialEvents) -> BTreeMap<u64, BTreeMap<&'static str, f64>> {
    let mut by_step: BTreeMap<u64, BTreeMap<&'static str, f64>> = BTreeMap::new();
    for e in &t.events {
        match e {
            Progress::Step {
                step,
                loss,
                lr,
                tokens_per_sec,
                ..
            } => {
                let s = by_step.entry(*step).or_default();
                s.insert("train/loss", *loss);
                s.insert("train/lr", *lr);
                s.insert("train/tokens_per_s", *tokens_per_sec);
            }
            Progress::Eval { step, valid_loss } => {
                let s = by_step.entry(*step).or_default();
                s.insert("valid/loss", *valid_loss);
                s.insert("valid/perplexity", valid_loss.exp());
            }
            _ => {}
        }
    }
    by_step
}

/// The resolved config flattened to `a.b.c` keys: numbers, strings and booleans as themselves,
/// lists as their JSON text, nulls left out (TensorBoard's hparams are scalars).
pub fn hparams_of(c: &TrialConfig) -> BTreeMap<String, PbKind> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, PbKind>) {
        use serde_json::Value as V;
        let key = |k: &str| {
            if prefix.is_empty() {
                k.to_string()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match v {
            V::Object(m) => {
                for (k, v) in m {
                    walk(&key(k), v, out);
                }
            }
            V::Null => {}
            V::Bool(b) => {
                out.insert(prefix.to_string(), PbKind::Bool(*b));
            }
            V::Number(n) => {
                out.insert(
                    prefix.to_string(),
                    PbKind::Number(n.as_f64().unwrap_or(f64::NAN)),
                );
            }
            V::String(s) => {
                out.insert(prefix.to_string(), PbKind::Str(s.clone()));
            }
            V::Array(_) => {
                out.insert(prefix.to_string(), PbKind::Str(v.to_string()));
            }
        }
    }
    let mut out = BTreeMap::new();
    let v = serde_json::to_value(c).expect("TrialConfig serialises");
    walk("", &v, &mut out);
    out
}

/// The encoded events of one trial's file: the version record, the hyperparameters (when the
/// config is known), then one event per step with that step's scalars.
pub fn trial_events(
    config: Option<&TrialConfig>,
    id: &str,
    t: &TrialEvents,
    start_secs: f64,
) -> Vec<Event> {
    let mut out = vec![Event {
        wall_time: start_secs,
        step: 0,
        what: Some(EventWhat::FileVersion("brain.Event:2".into())),
    }];
    if let Some(c) = config {
        let ssi = SessionStartInfo {
            hparams: hparams_of(c)
                .into_iter()
                .chain([("trial".to_string(), PbKind::Str(id.to_string()))])
                .map(|(k, v)| (k, PbValue { kind: Some(v) }))
                .collect(),
            group_name: String::new(),
            start_time_secs: start_secs,
        };
        let content = HParamsPluginData {
            version: 0,
            session_start_info: Some(ssi),
        }
        .encode_to_vec();
        out.push(Event {
            wall_time: start_secs,
            step: 0,
            what: Some(EventWhat::Summary(Summary {
                value: vec![SummaryValue {
                    tag: SESSION_START_INFO_TAG.into(),
                    metadata: Some(SummaryMetadata {
                        plugin_data: Some(PluginData {
                            plugin_name: "hparams".into(),
                            content,
                        }),
                    }),
                    value: None,
                }],
            })),
        });
    }
    // Wall time of a step: when the coordinator recorded its event (the latest one wins, as the
    // value does), else the trial's start.
    let mut when: BTreeMap<u64, f64> = BTreeMap::new();
    for (i, e) in t.events.iter().enumerate() {
        let step = match e {
            Progress::Step { step, .. } | Progress::Eval { step, .. } => *step,
            _ => continue,
        };
        if let Some(ms) = t.unix_ms.get(i).filter(|ms| **ms > 0) {
            when.insert(step, *ms as f64 / 1000.0);
        }
    }
    for (step, scalars) in scalars_by_step(t) {
        out.push(Event {
            wall_time: when.get(&step).copied().unwrap_or(start_secs),
            step: step as i64,
            what: Some(EventWhat::Summary(Summary {
                value: scalars
                    .into_iter()
                    .map(|(tag, v)| SummaryValue {
                        tag: tag.into(),
                        metadata: None,
                        value: Some(SummaryValueKind::SimpleValue(v as f32)),
                    })
                    .collect(),
            })),
        });
    }
    out
}

/// A trial name as one path component: path separators, control characters and whitespace
/// become `_` (`freeze-2 seed=1` → `freeze-2_seed=1`), and a leading dot is escaped so the
/// folder is not hidden.
pub fn dir_name(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() || c.is_whitespace() || c == ':' {
                '_'
            } else {
                c
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let h = if rc == 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if h.is_empty() {
        "localhost".into()
    } else {
        dir_name(&h)
    }
}

/// Write `dir/tensorboard/<trial name>/events.out.tfevents.<secs>.<host>` for every trial with
/// recorded steps or evaluations. Earlier event files in those folders are removed first, so a
/// rewritten report does not show each curve twice. Returns the folders written.
pub fn write_tensorboard(
    dir: &Path,
    records: &[TrialRecord],
    events: &[TrialEvents],
) -> anyhow::Result<Vec<PathBuf>> {
    let root = dir.join("tensorboard");
    let now = crate::report::now_ms() as f64 / 1000.0;
    let host = host_name();
    let mut used: std::collections::HashSet<String> = Default::default();
    let mut written = Vec::new();
    for t in events {
        let has_scalars = t
            .events
            .iter()
            .any(|e| matches!(e, Progress::Step { .. } | Progress::Eval { .. }));
        if !has_scalars {
            continue;
        }
        let record = records.iter().find(|r| r.id == t.id);
        let mut name = dir_name(&t.name);
        if !used.insert(name.clone()) {
            name = format!("{name}-{}", t.id);
            used.insert(name.clone());
        }
        let tdir = root.join(&name);
        std::fs::create_dir_all(&tdir)
            .with_context(|| format!("creating TensorBoard folder {}", tdir.display()))?;
        for entry in
            std::fs::read_dir(&tdir).with_context(|| format!("reading {}", tdir.display()))?
        {
            let entry = entry?;
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
            {
                let p = entry.path();
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
        let start = record
            .and_then(|r| r.started_ms)
            .map_or(now, |ms| ms as f64 / 1000.0);
        let mut bytes = Vec::new();
        for e in trial_events(record.and_then(|r| r.config.as_ref()), &t.id, t, start) {
            bytes.extend_from_slice(&tfrecord(&e.encode_to_vec()));
        }
        let path = tdir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let mut f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        f.write_all(&bytes)
            .with_context(|| format!("writing {}", path.display()))?;
        written.push(tdir);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// The layout of one record; that TensorBoard accepts it is checked end to end by
    /// coordinator/tests/tensorboard.rs.
    #[test]
    fn record_layout() {
        let r = tfrecord(b"abc");
        assert_eq!(r.len(), 8 + 4 + 3 + 4);
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[8..12], &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(&r[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn names_become_one_path_component() {
        assert_eq!(dir_name("freeze-2 seed=1"), "freeze-2_seed=1");
        assert_eq!(dir_name("a/b"), "a_b");
        assert_eq!(dir_name(".hidden"), "_.hidden");
        assert_eq!(dir_name(""), "_");
    }
}
