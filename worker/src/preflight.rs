//! Preflight at worker start: does this machine have what this build needs?
//!
//! A CUDA worker on the wrong host otherwise fails deep inside CUDA, minutes in, with an error that
//! names neither the cause nor the fix ("no kernel image is available", `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`).
//! Before it takes any trial the worker compares, and says in one line per mismatch what to
//! install or which image to use:
//!  - the NVIDIA driver against the CUDA release the build needs (13.0: driver 580 or newer);
//!  - each GPU it will use, its compute capability against the architecture the kernels were
//!    compiled for (`CUDA_COMPUTE_CAP` at build time; PTX runs there and on newer GPUs);
//!  - glibc against what NVIDIA's CUDA 13 libraries need (2.27).
//!
//! The facts come from the strings the driver gives (`/proc/driver/nvidia/version`,
//! `nvidia-smi --query-gpu=...`), so [`check`] is tested with those strings, without a GPU.

use std::process::Command;

/// The CUDA release a CUDA build is compiled against (scripts/build-cuda.sh pins 13.0).
pub const CUDA_RELEASE: (u32, u32) = (13, 0);
/// The oldest driver branch that runs CUDA 13.0 (NVIDIA's compatibility table: 580).
pub const MIN_DRIVER: u32 = 580;
/// NVIDIA's CUDA 13 wheels (cuBLAS, cuRAND) are tagged manylinux_2_27.
pub const MIN_GLIBC_CUDA: (u32, u32) = (2, 27);

/// What this binary needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Build {
    /// Built with the `cuda` feature.
    pub cuda: bool,
    /// The compute capability the kernels were compiled for (90 for 9.0), if known.
    pub compute_cap: Option<u32>,
}

impl Build {
    /// This binary: the `cuda` feature and `CUDA_COMPUTE_CAP` as they were at build time.
    pub fn this() -> Build {
        Build {
            cuda: cfg!(feature = "cuda"),
            compute_cap: option_env!("CUDA_COMPUTE_CAP").and_then(|v| v.trim().parse().ok()),
        }
    }
}

/// One GPU as `nvidia-smi --query-gpu=index,uuid,name,compute_cap` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpu {
    pub index: String,
    pub uuid: String,
    pub name: String,
    /// (major, minor); `None` where the driver does not report it.
    pub compute_cap: Option<(u32, u32)>,
}

/// What this machine has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Host {
    /// The kernel driver's version, e.g. "580.65.06"; `None` without a driver.
    pub driver: Option<String>,
    /// Every GPU nvidia-smi lists (all of the machine's, or the container's).
    pub gpus: Vec<Gpu>,
    /// Whether nvidia-smi answered (without it, compute capabilities are unknown).
    pub smi: bool,
    /// The running glibc, e.g. "2.31"; `None` on other C libraries.
    pub glibc: Option<String>,
}

/// The query [`Host::probe`] runs; [`parse_gpus`] reads its output.
pub const NVIDIA_SMI_ARGS: [&str; 2] = [
    "--query-gpu=index,uuid,name,compute_cap",
    "--format=csv,noheader",
];

impl Host {
    /// Read this machine: `/proc/driver/nvidia/version`, `nvidia-smi`, glibc.
    pub fn probe() -> Host {
        let driver = std::fs::read_to_string("/proc/driver/nvidia/version")
            .ok()
            .and_then(|t| parse_driver_version(&t));
        let smi = Command::new("nvidia-smi")
            .args(NVIDIA_SMI_ARGS)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        Host {
            driver,
            gpus: smi.as_deref().map(parse_gpus).unwrap_or_default(),
            smi: smi.is_some(),
            glibc: glibc_version(),
        }
    }
}

/// The running glibc's version (`gnu_get_libc_version`).
pub fn glibc_version() -> Option<String> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: gnu_get_libc_version returns a pointer to a static, NUL-terminated string
        // owned by glibc that lives for the whole process; it takes no arguments.
        let s = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
        Some(s.to_string_lossy().into_owned())
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// The version in `/proc/driver/nvidia/version`: "NVRM version: NVIDIA UNIX x86_64 Kernel
/// Module  580.65.06  Sun Jul 27 ..." (or "... Open Kernel Module for x86_64  580.65.06 ...").
pub fn parse_driver_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|w| {
            let parts: Vec<&str> = w.split('.').collect();
            parts.len() >= 2
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// Lines of `nvidia-smi --query-gpu=index,uuid,name,compute_cap --format=csv,noheader`:
/// "0, GPU-8f2c..., NVIDIA H100 80GB HBM3, 9.0". A driver too old for the `compute_cap` field
/// prints "[N/A]" (or refuses the query: no lines).
pub fn parse_gpus(text: &str) -> Vec<Gpu> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            if f.len() < 4 || f[0].parse::<u32>().is_err() {
                return None;
            }
            // A name may hold commas: the fields around it are fixed.
            let cap = f[f.len() - 1];
            Some(Gpu {
                index: f[0].to_string(),
                uuid: f[1].to_string(),
                name: f[2..f.len() - 1].join(", "),
                compute_cap: cap
                    .split_once('.')
                    .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?))),
            })
        })
        .collect()
}

/// The GPUs CUDA will show this process, in its order: `CUDA_VISIBLE_DEVICES` (indices or UUIDs,
/// or UUID prefixes, as CUDA accepts them) picks and orders them; unset means all.
pub fn visible<'a>(gpus: &'a [Gpu], cuda_visible_devices: Option<&str>) -> Vec<&'a Gpu> {
    let Some(list) = cuda_visible_devices else {
        return gpus.iter().collect();
    };
    let mut out = Vec::new();
    for id in list.split(',').map(str::trim) {
        // CUDA stops at the first entry it cannot resolve.
        let found = gpus
            .iter()
            .find(|g| g.index == id || (id.starts_with("GPU-") && g.uuid.starts_with(id)));
        match found {
            Some(g) => out.push(g),
            None => break,
        }
    }
    out
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

/// The newest CUDA a driver branch runs (NVIDIA's table), for the message.
fn driver_cuda(major: u32) -> Option<&'static str> {
    const TABLE: [(u32, &str); 11] = [
        (580, "13.0"),
        (575, "12.9"),
        (570, "12.8"),
        (560, "12.6"),
        (555, "12.5"),
        (550, "12.4"),
        (545, "12.3"),
        (535, "12.2"),
        (530, "12.1"),
        (525, "12.0"),
        (520, "11.8"),
    ];
    TABLE.iter().find(|(d, _)| major >= *d).map(|(_, c)| *c)
}

/// Check `host` against `build` for a worker that will use `gpus` (the GPUs it trains on; empty
/// for a CPU worker). Returns one line per mismatch, each naming what to do.
pub fn check(build: &Build, host: &Host, gpus: &[&Gpu], image_version: &str) -> Vec<String> {
    let mut out = Vec::new();
    if !build.cuda {
        return out;
    }
    let (cm, cn) = CUDA_RELEASE;
    match &host.driver {
        None => out.push(format!(
            "no NVIDIA driver here (/proc/driver/nvidia/version is missing): this CUDA build needs \
             driver {MIN_DRIVER} or newer (CUDA {cm}.{cn}); install it, or in a container pass the \
             GPUs in (docker run --gpus all with the NVIDIA container toolkit)"
        )),
        Some(v) => {
            let major = version_tuple(v).first().copied().unwrap_or(0);
            if major < MIN_DRIVER {
                let runs = driver_cuda(major)
                    .map(|c| format!(", which runs CUDA {c} at most"))
                    .unwrap_or_default();
                out.push(format!(
                    "NVIDIA driver {v}{runs}: this worker is built for CUDA {cm}.{cn} and needs \
                     driver {MIN_DRIVER} or newer; upgrade the driver (nvidia-smi shows \
                     \"CUDA Version\")"
                ));
            }
        }
    }
    if let Some(built) = build.compute_cap {
        let (bm, bn) = (built / 10, built % 10);
        for g in gpus {
            let Some((m, n)) = g.compute_cap else {
                continue;
            };
            if m * 10 + n < built {
                let cap = m * 10 + n;
                out.push(format!(
                    "GPU {} ({}) has compute capability {m}.{n}; this worker's kernels are built \
                     for {bm}.{bn} and newer: use the image ablate:{image_version}-cuda{cm}.{cn}-sm{cap}, \
                     or build with CUDA_COMPUTE_CAP={cap} scripts/build-cuda.sh",
                    g.index, g.name
                ));
            }
        }
    }
    if let Some(v) = &host.glibc {
        let t = version_tuple(v);
        let have = (
            t.first().copied().unwrap_or(0),
            t.get(1).copied().unwrap_or(0),
        );
        if have < MIN_GLIBC_CUDA {
            let (gm, gn) = MIN_GLIBC_CUDA;
            out.push(format!(
                "glibc {v} here; NVIDIA's CUDA {cm} libraries need {gm}.{gn} or newer: use the CUDA \
                 image (it brings its own), or a newer OS (RHEL 8, Ubuntu 20.04 or later)"
            ));
        }
    }
    out
}

/// The preflight found mismatches: `ablate-worker` exits [`ablate_proto::EXIT_CONFIG`] (78) on
/// it, like version skew, since restarting on the same machine cannot help.
#[derive(Debug)]
pub struct Mismatch(pub Vec<String>);

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "preflight: this machine cannot run this worker build:")?;
        for l in &self.0 {
            writeln!(f, "  - {l}")?;
        }
        write!(
            f,
            "(--skip-preflight, or ABLATE_SKIP_PREFLIGHT=1, starts it anyway)"
        )
    }
}

impl std::error::Error for Mismatch {}

/// The GPUs a worker on `device` trains on: none for `cpu`; `cuda:N` is the N-th GPU CUDA shows
/// (after `CUDA_VISIBLE_DEVICES`); `all` (the `--all-gpus` supervisor) is every visible one.
pub fn gpus_for<'a>(
    gpus: &'a [Gpu],
    device: &str,
    cuda_visible_devices: Option<&str>,
) -> Vec<&'a Gpu> {
    let shown = visible(gpus, cuda_visible_devices);
    if device == "all" {
        return shown;
    }
    match device
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(n) => shown.get(n).copied().into_iter().collect(),
        None if device == "cuda" => shown.into_iter().take(1).collect(),
        None => Vec::new(),
    }
}

/// Check `host` for a worker on `device` (`cpu`, `cuda:N`, or `all`): a CPU worker needs none of
/// the CUDA checks, even from a CUDA build.
pub fn gate(
    build: &Build,
    host: &Host,
    device: &str,
    cuda_visible_devices: Option<&str>,
) -> Result<(), Mismatch> {
    let build = if device == "cpu" {
        Build {
            cuda: false,
            compute_cap: None,
        }
    } else {
        build.clone()
    };
    let gpus = gpus_for(&host.gpus, device, cuda_visible_devices);
    let lines = check(&build, host, &gpus, env!("CARGO_PKG_VERSION"));
    if lines.is_empty() {
        Ok(())
    } else {
        Err(Mismatch(lines))
    }
}

/// [`gate`] on this binary and this machine.
pub fn run(device: &str) -> Result<(), Mismatch> {
    let build = Build::this();
    if !build.cuda || device == "cpu" {
        // Nothing to probe: do not run nvidia-smi for nothing.
        return Ok(());
    }
    let cvd = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    gate(&build, &Host::probe(), device, cvd.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_580: &str = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 07:09:02 UTC 2025\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14+deb12u1) \n";
    const PROC_OPEN_550: &str = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release Build  (dvs-builder@U16-I3-B03-4-3)  Tue Mar  5 22:15:33 UTC 2024\nGCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04) \n";
    const SMI: &str = "0, GPU-8f2c1a3e-0000-1111-2222-333344445555, NVIDIA H100 80GB HBM3, 9.0\n1, GPU-1b7d9e00-aaaa-bbbb-cccc-ddddeeeeffff, Tesla T4, 7.5\n";

    fn cuda90() -> Build {
        Build {
            cuda: true,
            compute_cap: Some(90),
        }
    }

    #[test]
    fn reads_the_driver_version_of_both_kernel_modules() {
        assert_eq!(parse_driver_version(PROC_580).as_deref(), Some("580.65.06"));
        assert_eq!(
            parse_driver_version(PROC_OPEN_550).as_deref(),
            Some("550.54.15")
        );
        assert_eq!(parse_driver_version("garbage\n"), None);
    }

    #[test]
    fn reads_nvidia_smi_and_picks_what_cuda_visible_devices_shows() {
        let gpus = parse_gpus(SMI);
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[1].name, "Tesla T4");
        assert_eq!(gpus[1].compute_cap, Some((7, 5)));
        let old = parse_gpus("0, GPU-x, Tesla K80, [N/A]\n");
        assert_eq!(old[0].compute_cap, None);
        assert_eq!(visible(&gpus, None).len(), 2);
        assert_eq!(visible(&gpus, Some("1"))[0].name, "Tesla T4");
        assert_eq!(visible(&gpus, Some("GPU-8f2c"))[0].index, "0");
        // CUDA stops at the first id it cannot resolve.
        assert_eq!(visible(&gpus, Some("1,7,0")).len(), 1);
    }

    #[test]
    fn a_good_host_passes() {
        let gpus = parse_gpus(SMI);
        let host = Host {
            driver: parse_driver_version(PROC_580),
            gpus: gpus.clone(),
            smi: true,
            glibc: Some("2.31".into()),
        };
        let lines = check(&cuda90(), &host, &visible(&gpus, Some("0")), "0.1.0");
        assert!(lines.is_empty(), "{lines:?}");
        // A CPU build checks nothing of this.
        let cpu = Build {
            cuda: false,
            compute_cap: None,
        };
        assert!(check(&cpu, &Host::default(), &[], "0.1.0").is_empty());
    }

    #[test]
    fn each_mismatch_is_one_line_naming_the_fix() {
        let gpus = parse_gpus(SMI);
        let host = Host {
            driver: parse_driver_version(PROC_OPEN_550),
            gpus: gpus.clone(),
            smi: true,
            glibc: Some("2.26".into()),
        };
        let lines = check(&cuda90(), &host, &visible(&gpus, Some("1")), "0.1.0");
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].contains("driver 550.54.15, which runs CUDA 12.4 at most"));
        assert!(lines[0].contains("needs driver 580 or newer"));
        assert!(lines[1].starts_with("GPU 1 (Tesla T4) has compute capability 7.5"));
        assert!(lines[1].contains("ablate:0.1.0-cuda13.0-sm75"));
        assert!(lines[1].contains("CUDA_COMPUTE_CAP=75 scripts/build-cuda.sh"));
        assert!(lines[2].contains("glibc 2.26 here"));
        assert!(lines.iter().all(|l| !l.contains('\n')));
        // Newer GPUs run the PTX: an sm90 build on a 10.0 GPU is fine.
        let b200 = parse_gpus("0, GPU-z, NVIDIA B200, 10.0\n");
        let host = Host {
            driver: Some("580.82.07".into()),
            gpus: b200.clone(),
            smi: true,
            glibc: Some("2.36".into()),
        };
        assert!(check(&cuda90(), &host, &visible(&b200, None), "0.1.0").is_empty());
    }

    #[test]
    fn no_driver_says_what_to_install() {
        let lines = check(&cuda90(), &Host::default(), &[], "0.1.0");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].contains("no NVIDIA driver here"), "{}", lines[0]);
        assert!(lines[0].contains("--gpus all"), "{}", lines[0]);
    }

    #[test]
    fn the_gate_checks_the_gpus_the_worker_uses_and_names_the_way_out() {
        let host = Host {
            driver: parse_driver_version(PROC_580),
            gpus: parse_gpus(SMI),
            smi: true,
            glibc: Some("2.31".into()),
        };
        // cuda:0 under CUDA_VISIBLE_DEVICES=1 is the T4: too old for sm90 kernels.
        let e = gate(&cuda90(), &host, "cuda:0", Some("1")).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].starts_with("GPU 1 (Tesla T4)"), "{e}");
        let text = e.to_string();
        assert!(text.starts_with("preflight: "), "{text}");
        assert!(text.contains("--skip-preflight"), "{text}");
        assert!(gate(&cuda90(), &host, "cuda:0", None).is_ok());
        assert!(gate(&cuda90(), &host, "cuda:1", None).is_err());
        assert_eq!(gate(&cuda90(), &host, "all", None).unwrap_err().0.len(), 1);
        // A CPU worker of a CUDA build needs no driver.
        assert!(gate(&cuda90(), &Host::default(), "cpu", None).is_ok());
        assert!(gate(&cuda90(), &Host::default(), "cuda:0", None).is_err());
    }

    #[test]
    fn this_build_passes_on_a_cpu_worker() {
        assert!(run("cpu").is_ok());
    }

    #[test]
    fn this_machine_has_a_glibc_version() {
        let v = glibc_version().expect("a glibc build");
        assert!(version_tuple(&v) >= vec![2, 17], "{v}");
    }
}
