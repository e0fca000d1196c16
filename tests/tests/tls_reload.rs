//! Certificate rotation without dropping the sweep: `ablate serve --tls-cert --tls-key` with a
//! certificate from one CA, a real worker training over TLS; the files are replaced by a
//! certificate from another CA (key first, then certificate, as an operator's copy would land).
//! New connections get the new certificate (`ablate list` trusting only the old CA fails,
//! trusting the new one works) while the worker's open connection carries on: the sweep
//! finishes with one registration and every trial done at its first attempt.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, fault_sweep, find_listen_addr, processes_mentioning, run_cmd, Proc};

const WORKER_TOKEN: &str = "wk-tls-41c9e0";
const ADMIN_TOKEN: &str = "ad-tls-7d2a55";

/// A CA named `name` and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem,
/// server.key) as PEM text.
fn ca_and_cert(name: &str) -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, name);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "ablate coordinator");
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn count(db: &Path, sql: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn wait_until(what: &str, procs: &[&Proc], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while !f() {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {}\n{}", p.name, p.tail()))
                .collect();
            panic!("timed out waiting for {what}\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(150));
    }
}

#[test]
fn a_new_certificate_reaches_new_connections_and_the_running_sweep_goes_on() {
    let tmp = tempfile::Builder::new()
        .prefix("ablate-tls-reload-")
        .tempdir()
        .unwrap();
    let root = tmp.path();
    let p = |n: &str| -> PathBuf { root.join(n) };
    let (ca1, cert1, key1) = ca_and_cert("ablate test CA one");
    let (ca2, cert2, key2) = ca_and_cert("ablate test CA two");
    std::fs::write(p("ca1.pem"), &ca1).unwrap();
    std::fs::write(p("ca2.pem"), &ca2).unwrap();
    // The worker trusts both, as during a CA change (deploy/README.md, "Rotating certificates").
    std::fs::write(p("bundle.pem"), format!("{ca1}{ca2}")).unwrap();
    std::fs::write(p("server.pem"), &cert1).unwrap();
    std::fs::write(p("server.key"), &key1).unwrap();
    std::fs::write(p("worker.token"), WORKER_TOKEN).unwrap();
    std::fs::write(p("admin.token"), ADMIN_TOKEN).unwrap();
    let state = p("state");

    let mut cmd = Command::new(bin("ablate"));
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--lease-ttl",
        "5",
        "--state",
    ])
    .arg(&state)
    .arg("--worker-token-file")
    .arg(p("worker.token"))
    .arg("--admin-token-file")
    .arg(p("admin.token"))
    .arg("--tls-cert")
    .arg(p("server.pem"))
    .arg("--tls-key")
    .arg(p("server.key"))
    .env("RUST_LOG", "info");
    let mut coord = Proc::spawn("coordinator", &mut cmd);
    let addr = coord.wait_for(Duration::from_secs(60), find_listen_addr);
    let url = format!("https://{addr}");
    let ablate = |args: &[&str], ca: &str| {
        let mut c = Command::new(bin("ablate"));
        c.args(args)
            .args(["--coordinator", &url, "--token-file"])
            .arg(p("admin.token"))
            .arg("--ca")
            .arg(p(ca));
        let (ok, out, err) = run_cmd(&mut c, Duration::from_secs(60));
        (ok, format!("{out}{err}"))
    };
    let sweep = p("tls.toml");
    std::fs::write(&sweep, fault_sweep("tls", 20, 400)).unwrap();
    let (ok, out) = ablate(&["submit", sweep.to_str().unwrap()], "ca1.pem");
    assert!(ok, "submit: {out}");

    let mut wcmd = Command::new(bin("ablate-worker"));
    wcmd.args(["--coordinator", &url, "--name", "w", "--token-file"])
        .arg(p("worker.token"))
        .arg("--ca")
        .arg(p("bundle.pem"))
        .arg("--cache")
        .arg(p("cache"))
        .arg("--work-dir")
        .arg(p("work"))
        .env("RUST_LOG", "info")
        .env("RAYON_NUM_THREADS", "1");
    let worker = Proc::spawn("worker", &mut wcmd);
    let db = state.join("ablate.sqlite");
    wait_until("a fine-tune trial running", &[&coord, &worker], || {
        db.exists()
            && count(
                &db,
                "SELECT COUNT(*) FROM trials WHERE state = 'running' AND depends_on IS NOT NULL",
            ) > 0
    });

    // The new pair lands key first: for a moment the files do not match, and nothing changes.
    replace(&p("server.key"), &key2);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = ablate(&["list"], "ca1.pem");
    assert!(
        ok,
        "the old certificate while the pair is half written: {out}"
    );
    replace(&p("server.pem"), &cert2);
    coord.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = ablate(&["list"], "ca2.pem");
    assert!(ok, "new connections get the new certificate: {out}");
    let (ok, out) = ablate(&["list"], "ca1.pem");
    assert!(
        !ok,
        "a client trusting only the old CA must fail now: {out}"
    );

    wait_until("every trial finished", &[&coord, &worker], || {
        count(&db, "SELECT COUNT(*) FROM trials WHERE state <> 'finished'") == 0
    });
    assert_eq!(count(&db, "SELECT COUNT(*) FROM trials"), 3);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM attempts WHERE attempt > 1 OR outcome <> 'finished'"
        ),
        0,
        "an attempt was lost over the rotation\n{}\n{}",
        coord.tail(),
        worker.tail()
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM workers"),
        1,
        "the worker had to register again\n{}",
        worker.tail()
    );
    let log = coord.log.lock().unwrap().join("\n");
    assert!(
        log.contains("does not load: still serving the previous one"),
        "{log}"
    );
    assert!(log.contains("TLS certificate changed"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "key material in the log");
    drop(worker);
    drop(coord);
    assert!(processes_mentioning(&root.display().to_string()).is_empty());
}
