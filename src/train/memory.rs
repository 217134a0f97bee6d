//! Host memory: every buffer whose size comes from user input (model configuration, batch,
//! sequence length, data size) is added up here and compared with the memory that is available
//! before anything is allocated, so an oversized setting is a clear error, not an abort in the
//! allocator. The large buffers are then allocated with `try_reserve_exact`, so an estimate that
//! was still too low is an error too.

use crate::train::error::{Result, TrainError as Error};

/// Bytes in a human unit: `5.1 TB`, `812.0 MB`, `96 B`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// The memory this process may still use: `MemAvailable` of /proc/meminfo, lowered to the room
/// left under a cgroup v2 limit when one is set; `None` where neither can be read (then only the
/// allocator's own refusal protects).
pub fn available_bytes() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let mem = meminfo.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    });
    let read = |name: &str| -> Option<u128> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (mem, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Named buffer sizes of one command, checked together against the available memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryPlan {
    items: Vec<(String, Option<u128>)>,
}

impl MemoryPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `count` elements of `bytes_each` bytes (`None`: the count itself overflowed).
    pub fn add(&mut self, name: impl Into<String>, count: Option<usize>, bytes_each: usize) {
        let bytes = count.map(|c| c as u128 * bytes_each as u128);
        self.items.push((name.into(), bytes));
    }

    /// The total in bytes (`None` on overflow).
    pub fn total(&self) -> Option<u128> {
        self.items
            .iter()
            .try_fold(0u128, |a, (_, b)| a.checked_add((*b)?))
    }

    /// `what` (e.g. "training at --batch 8 --seq 100000") fits the available memory, else an
    /// [`Error::OutOfMemory`] that lists the buffers, largest first.
    pub fn check(&self, what: &str) -> Result<()> {
        self.check_against(what, available_bytes())
    }

    /// [`check`](Self::check) against a given amount (tests).
    pub fn check_against(&self, what: &str, available: Option<u128>) -> Result<()> {
        let total = self.total();
        let fits = match (total, available) {
            (Some(t), Some(a)) => t <= a,
            (Some(t), None) => t <= isize::MAX as u128,
            (None, _) => false,
        };
        if fits {
            return Ok(());
        }
        let mut items = self.items.clone();
        items.sort_by(|a, b| b.1.unwrap_or(u128::MAX).cmp(&a.1.unwrap_or(u128::MAX)));
        let parts: Vec<String> = items
            .iter()
            .filter(|(_, b)| *b != Some(0))
            .take(4)
            .map(|(n, b)| match b {
                Some(b) => format!("{n} {}", human_bytes(*b)),
                None => format!("{n} more than 2^64 bytes"),
            })
            .collect();
        Err(Error::OutOfMemory {
            what: what.to_string(),
            needed: match total {
                Some(t) => format!("{} ({})", human_bytes(t), parts.join(", ")),
                None => format!("more than 2^64 bytes ({})", parts.join(", ")),
            },
            available: match available {
                Some(a) => format!("{} are available", human_bytes(a)),
                None => "the address space cannot hold it".into(),
            },
        })
    }
}

/// A vector of `len` copies of `value`, or an error naming `what` if the allocator refuses.
pub fn filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
        what: what.to_string(),
        needed: human_bytes(len as u128 * std::mem::size_of::<T>() as u128),
        available: "the allocator refused it".into(),
    })?;
    v.resize(len, value);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(human_bytes(96), "96 B");
        assert_eq!(human_bytes(5_136_179_200_000), "5.1 TB");
    }

    #[test]
    fn plan_reports_sizes() {
        let mut p = MemoryPlan::new();
        p.add("activations", Some(1 << 40), 4);
        p.add("parameters", Some(10), 4);
        assert!(p.check_against("x", Some(1 << 50)).is_ok());
        let msg = p
            .check_against("training", Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("training needs 4.4 TB (activations 4.4 TB"),
            "{msg}"
        );
        assert!(msg.ends_with("but 1.1 GB are available"), "{msg}");
        p.add("overflow", None, 4);
        let msg = p.check_against("t", Some(1 << 50)).unwrap_err().to_string();
        assert!(msg.contains("more than 2^64 bytes"), "{msg}");
    }

    #[test]
    fn filled_refuses_absurd_sizes() {
        assert!(filled(usize::MAX / 8, 0.0f32, "x").is_err());
        assert_eq!(filled(3, 0.0f32, "x").unwrap(), vec![0.0; 3]);
    }
}
