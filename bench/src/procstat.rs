//! CPU and memory accounting from /proc: the service's, the simulator's,
//! PostgreSQL's, the generator's own and the whole machine's.

use serde_json::{json, Value};

const TICKS: f64 = 100.0;

fn proc_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields after the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the full line: utime, stime (index 11, 12 after the name).
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / TICKS)
}

/// CPU seconds of every process whose name is `comm` (PostgreSQL's backends).
fn comm_cpu(comm: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .filter_map(proc_cpu)
        .sum()
}

pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[derive(Clone, Copy)]
pub struct CpuSnap {
    service: f64,
    sim: f64,
    postgres: f64,
    gen: f64,
    /// Busy CPU seconds of the whole machine (/proc/stat), to see other load.
    machine: f64,
}

fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else {
        return 0.0;
    };
    let f: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: busy = all but idle and iowait.
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle) / TICKS
}

/// CPU seconds so far of the service (`pid`), the simulator (`sim_pid`), PostgreSQL,
/// this process and the machine.
pub fn cpu_snap(pid: Option<u32>, sim_pid: Option<u32>) -> CpuSnap {
    CpuSnap {
        service: pid.and_then(proc_cpu).unwrap_or(0.0),
        sim: sim_pid.and_then(proc_cpu).unwrap_or(0.0),
        postgres: comm_cpu("postgres"),
        gen: proc_cpu(std::process::id()).unwrap_or(0.0),
        machine: machine_busy(),
    }
}

pub fn cpu_json(a: CpuSnap, b: CpuSnap, secs: f64) -> Value {
    let share = |x: f64, y: f64| ((y - x) / secs * 100.0).round() / 100.0;
    json!({
        "service": share(a.service, b.service),
        "postgres": share(a.postgres, b.postgres),
        "sim": share(a.sim, b.sim),
        "generator": share(a.gen, b.gen),
        "machine": share(a.machine, b.machine),
    })
}
