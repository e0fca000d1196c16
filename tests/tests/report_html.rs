//! The comparison report of a real finished sweep: `ablate run` on the tiny two-stage sweep
//! (pretrain on Shakespeare, fine-tune on Milton), then
//! - every trial is in summary.md, summary.csv, summary.json and report.html with the same
//!   numbers, and curves.csv / samples.md / trials/<id>.json hold what the trials reported;
//! - report.html, rendered by headless Chromium (Debian `chromium`, installed by
//!   scripts/chromium.sh), shows the table rows and the SVG plots after rendering (`--dump-dom`)
//!   and makes a screenshot that is not blank and carries the plots' colours.
//!
//! The browser half is its own test: `#[ignore]`d outside CI (the `ablate_ci` cfg of build.rs),
//! run by scripts/test (which installs chromium first) and under CI, where a missing chromium is
//! a failure. Both tests share one run of the sweep.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use e2e::{bin, run_cmd, shared_cache, tiny_sweep};
use serde_json::Value;

/// The tiny sweep's trials: pretrain, baseline, freeze-1, freeze-all, gradual, inheritune-1.
const TINY_TRIALS: usize = 6;

/// Minimal CSV line reader (quoted fields with doubled quotes).
fn csv_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// `chromium` on PATH (scripts/chromium.sh installs it; a test installs nothing itself).
fn chromium() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("chromium"))
                .find(|c| c.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "the browser checks of report.html need `chromium` on PATH: run `bash \
                 scripts/chromium.sh` (scripts/test does)"
            )
        })
}

fn headless(chromium: &Path, profile: &Path) -> Command {
    let mut cmd = Command::new(chromium);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        // No network: the page must be self-contained.
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}

/// Decode an RGB(A) PNG into (width, height, RGBA pixels).
fn read_png(path: &Path) -> (u32, u32, Vec<[u8; 4]>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("PNG size")];
    let info = reader.next_frame(&mut buf).expect("a PNG frame");
    let px = match info.color_type {
        png::ColorType::Rgba => buf[..info.buffer_size()]
            .chunks_exact(4)
            .map(|c| [c[0], c[1], c[2], c[3]])
            .collect(),
        png::ColorType::Rgb => buf[..info.buffer_size()]
            .chunks_exact(3)
            .map(|c| [c[0], c[1], c[2], 255])
            .collect(),
        other => panic!("unexpected PNG colour type {other:?}"),
    };
    (info.width, info.height, px)
}

/// The output directory of one `ablate run` of the tiny sweep and its log, made once for both
/// tests of this file (the second to ask waits for the first).
fn finished_sweep() -> &'static (PathBuf, String) {
    static SWEEP: OnceLock<(PathBuf, String)> = OnceLock::new();
    SWEEP.get_or_init(|| {
        let ablate = bin("ablate");
        bin("ablate-worker");
        // Statics are never dropped: a fixed directory, cleared first, instead of a TempDir.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-html");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let sweep = root.join("tiny.toml");
        std::fs::write(&sweep, tiny_sweep("report-html")).unwrap();
        let out = root.join("out");
        let (ok, log, _) = run_cmd(
            Command::new(&ablate)
                .arg("run")
                .arg(&sweep)
                .arg("--out")
                .arg(&out)
                .arg("--cache")
                .arg(shared_cache()),
            Duration::from_secs(900),
        );
        assert!(ok, "ablate run failed:\n{log}");
        (out, log)
    })
}

#[test]
fn report_of_a_finished_tiny_sweep_in_every_format() {
    let (out, log) = finished_sweep();
    assert!(
        log.contains("report.html"),
        "ablate run names the HTML report:\n{log}"
    );

    // --- the files: same trials, same numbers.
    let read =
        |f: &str| std::fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    let json: Vec<Value> = serde_json::from_str(&read("summary.json")).unwrap();
    assert_eq!(json.len(), TINY_TRIALS, "{json:#?}");
    let csv = read("summary.csv");
    let mut lines = csv.lines();
    let header = csv_line(lines.next().unwrap());
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let csv_rows: Vec<Vec<String>> = lines.map(csv_line).collect();
    let md = read("summary.md");
    let html = read("report.html");
    let curves = read("curves.csv");
    let samples = read("samples.md");
    for (j, c) in json.iter().zip(&csv_rows) {
        let id = j["trial"].as_str().unwrap();
        let name = j["name"].as_str().unwrap();
        assert_eq!(c[col("trial")], id, "CSV and JSON rows in the same order");
        assert_eq!(j["status"], "finished", "{j:#}");
        let ppl = j["perplexity"].as_f64().unwrap();
        assert_eq!(c[col("perplexity")].parse::<f64>().unwrap(), ppl);
        let md_line = md
            .lines()
            .find(|l| l.starts_with('|') && l.contains(id))
            .unwrap_or_else(|| panic!("{name} not in summary.md"));
        assert!(md_line.contains(&format!("| {ppl:.2} |")), "{md_line}");
        // The HTML row of this trial carries the same rounded perplexity.
        let at = html
            .find(&format!("<tr class=\"done\" data-trial=\"{id}\">"))
            .unwrap_or_else(|| panic!("{name} ({id}) has no row in report.html"));
        let tr = &html[at..at + html[at..].find("</tr>").unwrap()];
        assert!(tr.contains(&format!(">{ppl:.2}</td>")), "{tr}");
        assert!(tr.contains(&format!(">{name}<br>")), "{tr}");
        // Its exact config is in the page and in trials/<id>.json.
        let config = read(&format!("trials/{id}.json"));
        let cfg: Value = serde_json::from_str(&config).unwrap();
        assert_eq!(cfg["name"], name);
        assert!(
            html.contains(&format!("id=\"trial-{id}\"")),
            "no config block for {name}"
        );
        let method = j["method"].as_str().unwrap();
        if method != "baseline" {
            let n = curves
                .lines()
                .filter(|l| l.starts_with(&format!("{id},")))
                .count();
            assert!(n > 0, "{name} has no loss curve in curves.csv");
            assert!(
                samples.contains(&format!("## {name} (`{id}`)")),
                "{name} has no samples"
            );
        }
    }
    // One loss chart per trained method family, plus the perplexity bars.
    for family in ["pretrain", "freeze", "gradual", "inheritune"] {
        assert!(
            html.contains(&format!("data-family=\"{family}\"><svg")),
            "no {family} chart in report.html"
        );
    }
    assert!(html.contains("<figure id=\"perplexity-figure\"><svg"));
    // Every trained trial says what it ran on: the workers' ablate and candle versions, device.
    assert_eq!(
        html.matches("<dt>candle</dt><dd>0.").count(),
        TINY_TRIALS,
        "every trial's environment in report.html"
    );
    assert!(html.contains("<dt>device</dt><dd>cpu</dd>"));
    // Nothing to fetch: the only URLs are the SVG namespace declarations.
    let urls = html
        .replace("http://www.w3.org/2000/svg", "")
        .replace("http://www.w3.org/1999/xlink", "")
        .matches("://")
        .count();
    assert_eq!(
        urls, 0,
        "report.html must not load anything from the network"
    );
    // The sweep file as submitted (HTML-escaped inside its <pre>).
    assert!(
        html.contains("name = &quot;report-html&quot;"),
        "the sweep file is in the page"
    );
    if let Some(keep) = std::env::var_os("ABLATE_KEEP_REPORT") {
        let _ = std::fs::copy(out.join("report.html"), keep);
    }
}

#[test]
#[cfg_attr(
    not(ablate_ci),
    ignore = "needs chromium (scripts/chromium.sh); scripts/test and CI run it"
)]
fn report_html_renders_in_a_browser() {
    let chromium = chromium();
    let (out, _) = finished_sweep();
    let json: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let page = format!("file://{}", out.join("report.html").display());
    let profile = tmp.path().join("chromium-profile");
    let (ok, dom, _) = run_cmd(
        headless(&chromium, &profile).args(["--dump-dom", &page]),
        Duration::from_secs(120),
    );
    assert!(ok, "chromium --dump-dom failed:\n{dom}");
    for j in &json {
        let id = j["trial"].as_str().unwrap();
        assert!(
            dom.contains(&format!("data-trial=\"{id}\"")),
            "rendered DOM lacks the row of {id}"
        );
    }
    let svgs = dom.matches("<svg").count();
    assert!(
        svgs >= 5,
        "rendered DOM has {svgs} <svg> elements, expected 4 charts + bars"
    );
    assert!(dom.contains("id=\"summary-table\""));

    let shot = tmp.path().join("report.png");
    let (ok, log, _) = run_cmd(
        headless(&chromium, &profile)
            .arg(format!("--screenshot={}", shot.display()))
            .arg("--window-size=1280,2600")
            .arg(&page),
        Duration::from_secs(120),
    );
    assert!(ok && shot.is_file(), "chromium --screenshot failed:\n{log}");
    if let Some(keep) = std::env::var_os("ABLATE_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
    let (w, h, px) = read_png(&shot);
    assert_eq!((w, h), (1280, 2600));
    let non_white = px
        .iter()
        .filter(|p| p[0] < 235 || p[1] < 235 || p[2] < 235)
        .count();
    let frac = non_white as f64 / px.len() as f64;
    assert!(
        frac > 0.02,
        "the screenshot is blank ({:.2}% non-white pixels)",
        frac * 100.0
    );
    // The first series colour of the plots (Okabe–Ito blue, #0072b2) is on screen: the SVG
    // charts were drawn, not just the table.
    let blue = px
        .iter()
        .filter(|p| {
            (p[0] as i32).abs() < 30
                && (p[1] as i32 - 114).abs() < 30
                && (p[2] as i32 - 178).abs() < 30
        })
        .count();
    assert!(
        blue > 200,
        "no plot colour in the screenshot ({blue} blue pixels)"
    );
}
