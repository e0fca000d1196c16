//! Which GPUs this host has and what they are, without linking CUDA: the CPU build of the worker
//! must run (and `--all-gpus` must count GPUs) on a machine with no CUDA library at all.
//!
//! Sources, in order: `CUDA_VISIBLE_DEVICES` when set (`""` or `-1` mean none), `nvidia-smi`
//! (`-L` to list, `--query-gpu` for name and memory), and `/proc/driver/nvidia/gpus/` (one folder
//! per GPU, named by PCI bus id, with the model name in `information`) when nvidia-smi is missing,
//! as in slim containers that only get the driver's device files.
//!
//! Indices follow nvidia-smi's PCI bus order; CUDA numbers devices fastest-first unless
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`, which `--all-gpus` and the deploy units set so `cuda:N` and
//! nvidia-smi's `N` are the same card.

use std::path::Path;
use std::process::{Command, Stdio};

/// Ids of the GPUs this process may use, as values for a child's `CUDA_VISIBLE_DEVICES`.
pub fn visible_gpus() -> Vec<String> {
    if let Ok(v) = std::env::var("CUDA_VISIBLE_DEVICES") {
        return parse_visible_devices(&v);
    }
    if let Some(out) = nvidia_smi(&["-L"]) {
        return parse_nvidia_smi_list(&out);
    }
    proc_gpus(Path::new("/proc/driver/nvidia/gpus"))
        .iter()
        .enumerate()
        .map(|(i, _)| i.to_string())
        .collect()
}

/// The environment that pins a child process to GPU `gpu` (a value of [`visible_gpus`]: an
/// nvidia-smi index or a UUID), so that the child's `cuda:0` is that card. `CUDA_VISIBLE_DEVICES`
/// indices are nvidia-smi's only under `CUDA_DEVICE_ORDER=PCI_BUS_ID` (CUDA's default order is
/// fastest first), so both are always set together: `ablate run` and `ablate-worker --all-gpus`
/// start their GPU workers with this, and one of them once set only the first.
pub fn pin_to_gpu_env(gpu: &str) -> [(&'static str, String); 2] {
    [
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string()),
        ("CUDA_VISIBLE_DEVICES", gpu.to_string()),
    ]
}

/// `0,2` → ["0", "2"]; `""` and `-1` → none. CUDA stops at the first invalid entry.
pub fn parse_visible_devices(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .take_while(|s| !s.starts_with('-'))
        .map(String::from)
        .collect()
}

/// The `N` of each `GPU N: ...` line of `nvidia-smi -L` (MIG lines are indented and skipped).
pub fn parse_nvidia_smi_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("GPU "))
        .filter_map(|rest| rest.split(':').next())
        .map(|n| n.trim().to_string())
        .collect()
}

/// Name and memory (bytes; 0 when unknown) of the GPU a worker started with `--device cuda:N`
/// trains on, for the registration the status table shows.
pub fn describe_cuda(device: &str) -> (String, u64) {
    let ordinal: usize = device
        .strip_prefix("cuda")
        .map(|r| r.trim_start_matches(':'))
        .and_then(|r| {
            if r.is_empty() {
                Some(0)
            } else {
                r.parse().ok()
            }
        })
        .unwrap_or(0);
    // cuda:N counts within CUDA_VISIBLE_DEVICES; nvidia-smi wants the host's id (or a UUID).
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(v) => parse_visible_devices(&v).get(ordinal).cloned(),
        Err(_) => Some(ordinal.to_string()),
    };
    let Some(id) = id else {
        return (format!("{device} (not visible)"), 0);
    };
    if let Some(out) = nvidia_smi(&[
        "--query-gpu=name,memory.total",
        "--format=csv,noheader,nounits",
        "-i",
        &id,
    ]) {
        if let Some((name, mem)) = parse_query_gpu(&out) {
            return (name, mem);
        }
    }
    let gpus = proc_gpus(Path::new("/proc/driver/nvidia/gpus"));
    if let Some(model) = id
        .parse::<usize>()
        .ok()
        .and_then(|i| gpus.get(i))
        .and_then(|d| proc_gpu_model(d))
    {
        return (model, 0);
    }
    (format!("{device} (gpu {id})"), 0)
}

/// One line `NVIDIA H100 80GB HBM3, 81559` (MiB) → (name, bytes).
pub fn parse_query_gpu(out: &str) -> Option<(String, u64)> {
    let line = out.lines().map(str::trim).find(|l| !l.is_empty())?;
    let (name, mem) = line.rsplit_once(',')?;
    let mib: u64 = mem.trim().parse().ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| (name.to_string(), mib * 1024 * 1024))
}

/// Folders of `/proc/driver/nvidia/gpus`, sorted by PCI bus id (nvidia-smi's order).
pub fn proc_gpus(root: &Path) -> Vec<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}

/// The `Model:` line of a `/proc/driver/nvidia/gpus/<bus>/information` file.
pub fn proc_gpu_model(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("information")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("Model:")
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
    })
}

/// stdout of a successful nvidia-smi run; `None` when it is missing or fails.
fn nvidia_smi(args: &[&str]) -> Option<String> {
    let out = Command::new("nvidia-smi")
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_child_sees_its_gpu_in_nvidia_smi_order() {
        let env = pin_to_gpu_env("2");
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES", "2".to_string())));
        assert!(env.contains(&("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string())));
    }

    #[test]
    fn visible_devices_follow_cuda_conventions() {
        assert_eq!(parse_visible_devices("0,2"), ["0", "2"]);
        assert_eq!(parse_visible_devices(" 1 "), ["1"]);
        assert!(parse_visible_devices("").is_empty());
        assert!(parse_visible_devices("-1").is_empty());
        assert_eq!(parse_visible_devices("3,-1,4"), ["3"]);
        assert_eq!(
            parse_visible_devices("GPU-8f2c,GPU-11aa"),
            ["GPU-8f2c", "GPU-11aa"]
        );
    }

    #[test]
    fn nvidia_smi_list_skips_mig_lines() {
        let out = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaa)\n  MIG 1g.10gb Device 0: (UUID: MIG-x)\nGPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbb)\n";
        assert_eq!(parse_nvidia_smi_list(out), ["0", "1"]);
        assert!(parse_nvidia_smi_list("No devices were found\n").is_empty());
    }

    #[test]
    fn query_gpu_line_gives_name_and_bytes() {
        assert_eq!(
            parse_query_gpu("NVIDIA H100 80GB HBM3, 81559\n"),
            Some(("NVIDIA H100 80GB HBM3".to_string(), 81559 * 1024 * 1024))
        );
        // A comma inside the name: the memory is the last field.
        assert_eq!(
            parse_query_gpu("Tesla T4, rev a, 15360"),
            Some(("Tesla T4, rev a".to_string(), 15360 * 1024 * 1024))
        );
        assert_eq!(parse_query_gpu("[N/A], [N/A]"), None);
        assert_eq!(parse_query_gpu(""), None);
    }

    #[test]
    fn proc_driver_folders_in_bus_order_with_models() {
        let d = tempfile::tempdir().unwrap();
        for (bus, model) in [
            ("0000:c1:00.0", "NVIDIA A100-SXM4-80GB"),
            ("0000:41:00.0", "NVIDIA RTX A6000"),
        ] {
            let g = d.path().join(bus);
            std::fs::create_dir_all(&g).unwrap();
            std::fs::write(
                g.join("information"),
                format!("Model: \t\t {model}\nIRQ:   157\nGPU UUID: \t GPU-x\n"),
            )
            .unwrap();
        }
        let gpus = proc_gpus(d.path());
        assert_eq!(gpus.len(), 2);
        assert_eq!(
            proc_gpu_model(&gpus[0]).as_deref(),
            Some("NVIDIA RTX A6000")
        );
        assert_eq!(
            proc_gpu_model(&gpus[1]).as_deref(),
            Some("NVIDIA A100-SXM4-80GB")
        );
        assert!(proc_gpus(&d.path().join("missing")).is_empty());
    }
}
