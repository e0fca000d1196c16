//! Multi-host: the coordinator and two workers on three "hosts" (network namespaces the test
//! creates, joined by veth pairs), with TLS (a private CA and a server certificate generated here
//! with rcgen) and tokens on, as an operator would deploy it on rented machines (deploy/README.md).
//!
//! ```text
//!   ns abmh-a-PID            ns abmh-c-PID (coordinator)           ns abmh-b-PID
//!   worker a, CLI   ──veth── 10.215.X.Y+1   10.215.X.Y+5 ──veth──  worker b
//!   10.215.X.Y+2                                                    10.215.X.Y+6
//! ```
//!
//! The coordinator listens on 0.0.0.0 inside its namespace, so the test also checks that it
//! refuses to start there without tokens, and that a client which does not trust the CA, or
//! presents no token, is turned away. Then a small real sweep (the fault suite's sweep on licence
//! texts every Debian machine carries, so no namespace needs a way out) runs across the two
//! workers and its report says every trial finished.
//!
//! Needs root (`ip netns add`): `#[ignore]`d outside CI (build.rs sets `ablate_ci` when `CI` is
//! set), run by scripts/test and under CI, where it fails when it cannot. The namespaces (and with them
//! the veth pairs) are removed on drop, also when an assertion fails; namespaces left by a test
//! process that was killed outright are removed by the next run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::{bin, fault_sweep, find_listen_addr, run_cmd, Proc};
use serde_json::Value;

const WORKER_TOKEN: &str = "wk-mh-5d1e9a0b3c";
const ADMIN_TOKEN: &str = "ad-mh-7f4c2e8a16";
const WAIT: Duration = Duration::from_secs(300);
const NS_PREFIX: &str = "abmh-";

/// Three namespaces: the coordinator's and two workers', each worker joined to the coordinator's
/// namespace by its own veth pair (a /30 each). Dropping it deletes them all.
struct Hosts {
    coord: String,
    workers: [String; 2],
    /// The coordinator's address on each worker's link.
    coord_ips: [String; 2],
    /// Host-side leftovers to delete should a step fail before they were moved.
    links: Vec<String>,
}

impl Hosts {
    fn create() -> Result<Hosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Err("no `ip` command (iproute2)".into());
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        let (x, y) = ((pid >> 8) & 0xff, pid & 0xf8);
        let net = |n: u32| format!("10.215.{x}.{}", y + n);
        let hosts = Hosts {
            coord: format!("{NS_PREFIX}c-{pid}"),
            workers: [format!("{NS_PREFIX}a-{pid}"), format!("{NS_PREFIX}b-{pid}")],
            coord_ips: [net(1), net(5)],
            links: (0..2)
                .flat_map(|i| [format!("mhc{i}-{pid}"), format!("mhw{i}-{pid}")])
                .collect(),
        };
        ip(&["netns", "add", &hosts.coord])?;
        ip(&["-n", &hosts.coord, "link", "set", "lo", "up"])?;
        for (i, ns) in hosts.workers.iter().enumerate() {
            let (c_if, w_if) = (format!("mhc{i}-{pid}"), format!("mhw{i}-{pid}"));
            let base = 4 * i as u32;
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["link", "add", &c_if, "type", "veth", "peer", "name", &w_if])?;
            ip(&["link", "set", &c_if, "netns", &hosts.coord])?;
            ip(&["link", "set", &w_if, "netns", ns])?;
            let c_addr = format!("{}/30", net(base + 1));
            let w_addr = format!("{}/30", net(base + 2));
            ip(&["-n", &hosts.coord, "addr", "add", &c_addr, "dev", &c_if])?;
            ip(&["-n", ns, "addr", "add", &w_addr, "dev", &w_if])?;
            ip(&["-n", &hosts.coord, "link", "set", &c_if, "up"])?;
            ip(&["-n", ns, "link", "set", &w_if, "up"])?;
        }
        Ok(hosts)
    }

    /// `ip netns exec NS` + the command.
    fn cmd(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.coord).chain(&self.workers) {
            let _ = ip(&["netns", "del", ns]);
        }
        // Deleting a namespace deletes the veth ends inside it and their peers; these only
        // exist if a step failed between creating a pair and moving it.
        for l in &self.links {
            let _ = Command::new("ip")
                .args(["link", "del", l])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Namespaces named by this test whose process no longer exists (a run killed with SIGKILL).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.get(2..).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A private CA and a server certificate for `ips`, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key).
fn make_certs(dir: &Path, ips: &[String]) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ablate multihost test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(ips.to_vec()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "ablate coordinator");
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[test]
#[cfg_attr(
    not(ablate_ci),
    ignore = "needs root for network namespaces (ip netns); scripts/test and CI run it"
)]
fn sweep_completes_across_three_hosts_with_tls_and_tokens() {
    let hosts = Hosts::create().unwrap_or_else(|why| {
        panic!("the multihost test needs network namespaces (run as root): {why}")
    });
    let tmp = tempfile::Builder::new()
        .prefix("ablate-multihost-")
        .tempdir()
        .unwrap();
    let root = tmp.path();
    let (ca, cert, key) = make_certs(root, &hosts.coord_ips);
    let worker_token = root.join("worker.token");
    let admin_token = root.join("admin.token");
    std::fs::write(&worker_token, format!("{WORKER_TOKEN}\n")).unwrap();
    std::fs::write(&admin_token, ADMIN_TOKEN).unwrap();
    let ablate = bin("ablate");
    let ablate_worker = bin("ablate-worker");

    // A coordinator reachable from other hosts refuses to start without tokens (TLS or not).
    let (ok, out, _) = run_cmd(
        Hosts::cmd(&hosts.coord, &ablate)
            .args(["serve", "--listen", "0.0.0.0:0", "--state"])
            .arg(root.join("refused-state"))
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key),
        Duration::from_secs(60),
    );
    assert!(!ok, "serve on 0.0.0.0 without tokens must fail:\n{out}");
    assert!(
        out.contains("refusing to listen") && out.contains("--worker-token-file"),
        "the refusal names the missing flags:\n{out}"
    );

    let mut coord = Proc::spawn(
        "coordinator",
        Hosts::cmd(&hosts.coord, &ablate)
            .args(["serve", "--listen", "0.0.0.0:0", "--state"])
            .arg(root.join("state"))
            .arg("--worker-token-file")
            .arg(&worker_token)
            .arg("--admin-token-file")
            .arg(&admin_token)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--lease-ttl", "30"])
            .env("RUST_LOG", "info"),
    );
    let addr = coord.wait_for(Duration::from_secs(60), find_listen_addr);
    let port = addr.rsplit(':').next().unwrap().to_string();
    let url = |i: usize| format!("https://{}:{port}", hosts.coord_ips[i]);

    // Clients on host a: the admin CLI with the CA and the token.
    let cli = |args: &[&str], ca: Option<&Path>, token: Option<&Path>| {
        let mut c = Hosts::cmd(&hosts.workers[0], &ablate);
        c.args(args).args(["--coordinator", &url(0)]);
        if let Some(ca) = ca {
            c.arg("--ca").arg(ca);
        }
        if let Some(t) = token {
            c.arg("--token-file").arg(t);
        }
        run_cmd(&mut c, Duration::from_secs(60))
    };
    let (ok, out, _) = cli(&["list"], None, Some(&admin_token));
    assert!(
        !ok,
        "a client that does not trust the private CA must fail the handshake:\n{out}"
    );
    let (ok, out, _) = cli(&["list"], Some(&ca), None);
    assert!(!ok, "a client without the admin token is refused:\n{out}");
    assert!(
        !out.contains(ADMIN_TOKEN) && !coord.tail().contains(ADMIN_TOKEN),
        "tokens never appear in output"
    );
    let (ok, out, _) = cli(&["list"], Some(&ca), Some(&admin_token));
    assert!(ok, "list over TLS with CA and token:\n{out}");

    let sweep_name = "multihost";
    let sweep_file = root.join("sweep.toml");
    std::fs::write(&sweep_file, fault_sweep(sweep_name, 20, 20)).unwrap();
    let sweep_arg = sweep_file.to_str().unwrap().to_string();
    let (ok, out, _) = cli(&["submit", &sweep_arg], Some(&ca), Some(&admin_token));
    assert!(ok, "submit over TLS:\n{out}");

    // One worker on each of the other two hosts, each dialling the coordinator's address on its
    // own link, with its own cache and work dir (nothing shared but the CA and the token file).
    let mut workers = Vec::new();
    for (i, name) in ["mh-a", "mh-b"].into_iter().enumerate() {
        let mut c = Hosts::cmd(&hosts.workers[i], &ablate_worker);
        c.args(["--coordinator", &url(i), "--name", name, "--ca"])
            .arg(&ca)
            .arg("--token-file")
            .arg(&worker_token)
            .arg("--cache")
            .arg(root.join(format!("cache-{name}")))
            .arg("--work-dir")
            .arg(root.join(format!("work-{name}")))
            .env("RUST_LOG", "info")
            .env("RAYON_NUM_THREADS", "1");
        workers.push(Proc::spawn(name, &mut c));
    }
    for w in &mut workers {
        w.wait_for(Duration::from_secs(60), |l| {
            l.contains("registered").then_some(())
        });
    }

    let (ok, out, _) = {
        let mut c = Hosts::cmd(&hosts.workers[0], &ablate);
        c.args([
            "status",
            sweep_name,
            "--watch",
            "--coordinator",
            &url(0),
            "--ca",
        ])
        .arg(&ca)
        .arg("--token-file")
        .arg(&admin_token)
        .env("NO_COLOR", "1");
        run_cmd(&mut c, WAIT)
    };
    let logs = || {
        let mut s = format!("--- coordinator\n{}\n", coord.tail());
        for w in &workers {
            s += &format!("--- {}\n{}\n", w.name, w.tail());
        }
        s
    };
    assert!(ok, "status --watch:\n{out}\n{}", logs());

    let report = root.join("report");
    let report_arg = report.to_str().unwrap().to_string();
    let (ok, out, _) = cli(
        &["report", sweep_name, "--out", &report_arg],
        Some(&ca),
        Some(&admin_token),
    );
    assert!(ok, "report over TLS:\n{out}");
    let rows: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).unwrap())
            .unwrap();
    // pretrain, freeze-1, freeze-all
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for r in &rows {
        assert_eq!(r["status"], "finished", "{r:#}\n{}", logs());
        let ppl = r["perplexity"].as_f64().expect("perplexity");
        assert!(ppl.is_finite() && ppl > 1.0, "{r:#}");
        let w = r["worker"].as_str().unwrap_or("");
        assert!(
            w.contains("mh-a") || w.contains("mh-b"),
            "trial run by one of the namespaced workers: {r:#}"
        );
    }
    let coord_log = coord.tail();
    for name in ["mh-a", "mh-b"] {
        assert!(
            coord
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("worker registered") && l.contains(name)),
            "the coordinator registered {name}:\n{coord_log}"
        );
    }
    let by: Vec<&str> = rows.iter().filter_map(|r| r["worker"].as_str()).collect();
    println!("multihost: sweep finished over TLS; trials ran on {by:?}");
    for l in coord.log.lock().unwrap().iter() {
        assert!(
            !l.contains(WORKER_TOKEN) && !l.contains(ADMIN_TOKEN),
            "a token in the coordinator's log: {l}"
        );
    }
    drop(workers);
    drop(coord);
    drop(hosts);
}
