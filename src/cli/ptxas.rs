//! `distill ptxas [--check]`: shows ptxas's resource report for every kernel (registers, spills,
//! stack, shared memory per architecture; written by build.rs when nvcc compiled the kernels) and,
//! with `--check`, fails when any kernel spills registers on the checked architectures.

use super::json::JsonLine;
use super::{print_line, CliError, CliResult, PtxasArgs};

/// One kernel on one architecture.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    arch: String,
    kernel: String,
    registers: u64,
    spill_stores: u64,
    spill_loads: u64,
    stack_bytes: u64,
    smem_bytes: u64,
}

const COLUMNS: [&str; 7] = [
    "arch",
    "kernel",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack_bytes",
    "smem_bytes",
];

pub fn run(args: &PtxasArgs) -> CliResult<()> {
    let entries = parse(distill_kernels::cuda::PTXAS_REPORT)?;
    if entries.is_empty() {
        return Err(CliError::new(
            "no ptxas report: this build has no compiled CUDA kernels (nvcc was not found when \
             the crate was built; set NVCC or CUDA_HOME and rebuild)",
        ));
    }
    let archs: Vec<String> = args
        .arch
        .iter()
        .map(|a| {
            if a.starts_with("sm_") {
                a.clone()
            } else {
                format!("sm_{a}")
            }
        })
        .collect();
    for a in &archs {
        if !entries.iter().any(|e| &e.arch == a) {
            return Err(CliError::new(format!(
                "--arch {a}: the ptxas report has no kernels for this architecture"
            )));
        }
    }
    let mut checked: Vec<&Entry> = entries
        .iter()
        .filter(|e| archs.is_empty() || archs.contains(&e.arch))
        .collect();
    checked.sort_by(|a, b| (&a.arch, &a.kernel).cmp(&(&b.arch, &b.kernel)));

    if !args.check {
        let mut table = String::from(
            "arch    registers  spill_stores  spill_loads  stack_bytes  smem_bytes  kernel\n",
        );
        for e in &checked {
            table.push_str(&format!(
                "{:<7} {:>9}  {:>12}  {:>11}  {:>11}  {:>10}  {}\n",
                e.arch,
                e.registers,
                e.spill_stores,
                e.spill_loads,
                e.stack_bytes,
                e.smem_bytes,
                e.kernel
            ));
        }
        print_line(table.trim_end())?;
    }

    let spilling: Vec<&&Entry> = checked
        .iter()
        .filter(|e| e.spill_stores > 0 || e.spill_loads > 0)
        .collect();
    if args.check {
        if let Some(first) = spilling.first() {
            let names: Vec<String> = spilling
                .iter()
                .map(|e| format!("{} on {}", e.kernel, e.arch))
                .collect();
            return Err(CliError::new(format!(
                "{} kernel(s) spill registers ({} bytes stored, {} loaded by the first): {}",
                spilling.len(),
                first.spill_stores,
                first.spill_loads,
                names.join(", ")
            )));
        }
        let line = JsonLine::new()
            .str("command", "ptxas")
            .uint("kernels", checked.len())
            .uint("spilling", 0)
            .uint(
                "max_registers",
                checked.iter().map(|e| e.registers).max().unwrap_or(0) as usize,
            )
            .str("archs", &archs_of(&checked).join(","))
            .finish();
        print_line(&line)?;
    }
    Ok(())
}

fn archs_of(entries: &[&Entry]) -> Vec<String> {
    let mut v: Vec<String> = entries.iter().map(|e| e.arch.clone()).collect();
    v.sort();
    v.dedup();
    v
}

/// Parses build.rs's TSV (a header line, then one line per kernel and architecture).
fn parse(tsv: &str) -> CliResult<Vec<Entry>> {
    let mut lines = tsv.lines().filter(|l| !l.trim().is_empty());
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let names: Vec<&str> = header.split('\t').collect();
    if names != COLUMNS {
        return Err(CliError::new(format!(
            "the ptxas report has columns {names:?}, expected {COLUMNS:?}"
        )));
    }
    lines
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split('\t').collect();
            let bad = || {
                CliError::new(format!(
                    "line {} of the ptxas report is malformed: {line:?}",
                    i + 2
                ))
            };
            if f.len() != COLUMNS.len() {
                return Err(bad());
            }
            let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
            Ok(Entry {
                arch: f[0].to_string(),
                kernel: f[1].to_string(),
                registers: num(f[2])?,
                spill_stores: num(f[3])?,
                spill_loads: num(f[4])?,
                stack_bytes: num(f[5])?,
                smem_bytes: num(f[6])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_build_report() {
        let tsv = "arch\tkernel\tregisters\tspill_stores\tspill_loads\tstack_bytes\tsmem_bytes\n\
                   sm_80\tdk_kd_f32_f32_f32\t40\t0\t0\t0\t256\n\
                   sm_90\tdk_softmax_bf16\t32\t8\t4\t16\t128\n";
        let e = parse(tsv).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].arch, "sm_90");
        assert_eq!((e[1].spill_stores, e[1].spill_loads), (8, 4));
        assert!(parse("").unwrap().is_empty());
        assert!(parse("arch\tkernel\n").is_err());
        assert!(parse(&format!("{}\nsm_80\tk\t1\t2\n", COLUMNS.join("\t"))).is_err());
    }
}
