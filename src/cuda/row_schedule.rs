//! How the fused loss lays a row out on the GPU: one block per row (two passes over DRAM), a row
//! split over several blocks (one launch per pass: few long rows), or a thread-block cluster that
//! keeps the row in shared memory (sm_90: one pass over DRAM). [`RowSchedule::Auto`] picks per
//! call; the others force a layout (tests, benchmarks) and are refused where it cannot run.

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// The layout of the fused loss's rows, set with
/// [`CudaKernels::set_row_schedule`](super::CudaKernels::set_row_schedule).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RowSchedule {
    /// Chosen per call from the shape, the dtypes and the device.
    #[default]
    Auto,
    /// One block per row, which reads the row twice (any device).
    Fused,
    /// Every row over this many blocks, one launch per pass (any device).
    Split(usize),
    /// Every row over a cluster of this many blocks (1 to 8) that holds it in shared memory, so
    /// that it is read from DRAM once: compute capability 9.0 or newer, student and teacher (and
    /// gradient) of one dtype, and a row that fits the cluster's shared memory.
    Cluster(usize),
}

/// What a call runs, once [`RowSchedule`] is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RowPlan {
    Fused,
    Split(usize),
    /// `blocks` per row of `threads` threads, each with `stash_elems` elements of each input and
    /// `smem` bytes of dynamic shared memory.
    Cluster {
        blocks: usize,
        threads: u32,
        stash_elems: usize,
        smem: usize,
    },
}

/// The most blocks a split call uses (rows x blocks per row): the workspace holds their partial
/// results.
pub(crate) const SPLIT_MAX_BLOCKS: usize = 1024;
/// The fewest elements a block of a split row takes: below this the row's reductions and launch
/// cost more than the parallelism wins.
const SPLIT_MIN_ELEMS: usize = 8192;
/// The most blocks of a cluster (the portable limit of sm_90).
pub(crate) const CLUSTER_MAX_BLOCKS: usize = 8;
/// Shared memory per block under which [`RowSchedule::Auto`] runs two 512-thread cluster blocks
/// per SM (228 KiB per SM, 1 KiB of it reserved per block): while one block waits at a reduction
/// or a cluster.sync(), the other streams. A bf16 pair of 131,072 logits fits over 5 blocks.
const CLUSTER_TWO_PER_SM_SMEM: usize = 113 * 1024;
/// Shared memory per block up to which [`RowSchedule::Auto`] runs one 1,024-thread cluster block
/// per SM (an f32 pair of 131,072 logits over 5 blocks).
const CLUSTER_ONE_PER_SM_SMEM: usize = 220 * 1024;
/// The most dynamic shared memory a block can have on sm_90 (227 KiB); a device that allows less
/// (`RowShape::smem_optin`) caps it.
const MAX_BLOCK_SMEM: usize = 227 * 1024;
/// Rows shorter than this stay on the fused path under [`RowSchedule::Auto`]: their second read
/// mostly hits L2, so the cluster's synchronisation is not worth it.
const CLUSTER_MIN_VOCAB: usize = 16384;

/// Blocks per row for the fused loss: one, unless the rows are too few to give every SM two
/// blocks and long enough to share (`rows` < 2 SMs and `vocab` >= 2 x SPLIT_MIN_ELEMS); then
/// enough to fill two blocks per SM, each with at least SPLIT_MIN_ELEMS elements.
pub(crate) fn split_for(rows: usize, vocab: usize, sms: usize) -> usize {
    let want = (2 * sms).div_ceil(rows.max(1));
    let split = want
        .min(vocab / SPLIT_MIN_ELEMS)
        .min(SPLIT_MAX_BLOCKS / rows.max(1));
    split.max(1)
}

/// Threads per block of the two-pass path's one block per row: about 8 elements per thread
/// (`threads_for`), at most 512 when the rows give every SM two blocks, so that one block's
/// reductions overlap the other's streaming (64 registers per thread allow 1,024 threads per SM
/// either way).
pub(crate) fn fused_threads(rows: usize, vocab: usize, sms: usize) -> u32 {
    let threads = super::ops::threads_for(vocab);
    if rows >= 2 * sms {
        threads.min(512)
    } else {
        threads
    }
}

/// The stash a cluster block needs (kernels/abi.h, `stash_elems`) and its dynamic shared memory:
/// the student's and teacher's slices, and for JSD with a gradient of a 16-bit dtype
/// (`jsd_grad`) the f32 log2 mixture that its pass 2 keeps for pass 3.
pub(crate) fn cluster_smem(
    vocab: usize,
    blocks: usize,
    dtype: Dtype,
    jsd_grad: bool,
) -> (usize, usize) {
    let size = dtype.size_bytes();
    let chunk = 16 / size;
    let stash_elems = (vocab / chunk).div_ceil(blocks) * chunk + 2 * chunk;
    let stash = |size: usize| (stash_elems * size + 16).next_multiple_of(16);
    let mixture = if jsd_grad && size == 2 { stash(4) } else { 0 };
    let header = crate::abi::DK_KD_CLUSTER_HEADER_BYTES as usize;
    (stash_elems, header + 2 * stash(size) + mixture)
}

/// The device and call facts a schedule is resolved against.
pub(crate) struct RowShape {
    pub rows: usize,
    pub vocab: usize,
    pub sms: usize,
    /// Compute capability major version.
    pub cc_major: i32,
    /// The student's and teacher's dtype when they are one, and the gradient (if any) too.
    pub one_dtype: Option<Dtype>,
    /// JSD with a gradient and a soft loss (its row-on-chip kernel keeps a third stash for
    /// 16-bit rows).
    pub jsd_grad: bool,
    /// The device's shared memory per block with opt-in (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
    pub smem_optin: usize,
}

impl RowShape {
    /// The most dynamic shared memory a cluster block may take here: also the limit set on the
    /// row-on-chip kernels before they are launched.
    pub(crate) fn max_block_smem(&self) -> usize {
        MAX_BLOCK_SMEM.min(self.smem_optin)
    }
}

impl RowSchedule {
    pub(crate) fn plan(self, shape: &RowShape) -> Result<RowPlan> {
        let RowShape {
            rows,
            vocab,
            sms,
            cc_major,
            one_dtype,
            jsd_grad,
            ..
        } = *shape;
        let max_block = shape.max_block_smem();
        let refuse = |value: String, reason: &'static str| Error::InvalidOption {
            name: "row schedule",
            value,
            reason,
        };
        match self {
            RowSchedule::Fused => Ok(RowPlan::Fused),
            RowSchedule::Split(n) => {
                if n == 0 || n.saturating_mul(rows) > SPLIT_MAX_BLOCKS {
                    return Err(refuse(
                        format!("Split({n}) of {rows} rows"),
                        "a split needs 1 to 1024 / rows blocks per row (the workspace's partials)",
                    ));
                }
                Ok(if n == 1 {
                    RowPlan::Fused
                } else {
                    RowPlan::Split(n)
                })
            }
            RowSchedule::Cluster(n) => {
                let value = || format!("Cluster({n})");
                if cc_major < 9 {
                    return Err(refuse(
                        value(),
                        "thread-block clusters need compute capability 9.0 or newer",
                    ));
                }
                let Some(dtype) = one_dtype else {
                    return Err(refuse(
                        value(),
                        "the row-on-chip kernels take student, teacher and gradient of one dtype",
                    ));
                };
                if !(1..=CLUSTER_MAX_BLOCKS).contains(&n) {
                    return Err(refuse(value(), "a cluster has 1 to 8 blocks"));
                }
                let (stash_elems, smem) = cluster_smem(vocab, n, dtype, jsd_grad);
                if smem > max_block {
                    return Err(refuse(
                        value(),
                        "the row does not fit the cluster's shared memory (the device's most per block)",
                    ));
                }
                Ok(RowPlan::Cluster {
                    blocks: n,
                    threads: super::ops::threads_for(vocab.div_ceil(n)),
                    stash_elems,
                    smem,
                })
            }
            RowSchedule::Auto => {
                let split = split_for(rows, vocab, sms);
                let cluster = match one_dtype {
                    Some(dtype) if cc_major >= 9 && vocab >= CLUSTER_MIN_VOCAB => {
                        // The fewest blocks whose slices fit two blocks per SM, else one.
                        let fit = |limit: usize, threads: u32| {
                            (1..=CLUSTER_MAX_BLOCKS).find_map(|blocks| {
                                let (stash_elems, smem) =
                                    cluster_smem(vocab, blocks, dtype, jsd_grad);
                                (smem <= limit).then(|| RowPlan::Cluster {
                                    blocks,
                                    threads: threads
                                        .min(super::ops::threads_for(vocab.div_ceil(blocks))),
                                    stash_elems,
                                    smem,
                                })
                            })
                        };
                        fit(CLUSTER_TWO_PER_SM_SMEM.min(max_block), 512)
                            .or_else(|| fit(CLUSTER_ONE_PER_SM_SMEM.min(max_block), 1024))
                    }
                    _ => None,
                };
                Ok(match cluster {
                    // Few rows: the split spreads them over more SMs than clusters would.
                    Some(RowPlan::Cluster { blocks, .. }) if split > 1 && rows * blocks < sms => {
                        RowPlan::Split(split)
                    }
                    Some(plan) => plan,
                    None if split > 1 => RowPlan::Split(split),
                    None => RowPlan::Fused,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: usize, vocab: usize, dtype: Option<Dtype>) -> RowShape {
        RowShape {
            rows,
            vocab,
            sms: 132,
            cc_major: 9,
            one_dtype: dtype,
            jsd_grad: false,
            smem_optin: 227 * 1024,
        }
    }

    #[test]
    fn auto_keeps_a_row_of_131072_on_five_blocks() {
        // bf16: two 512-thread blocks per SM; f32: one 1,024-thread block per SM.
        for (dtype, threads, limit) in [
            (Dtype::Bf16, 512, CLUSTER_TWO_PER_SM_SMEM),
            (Dtype::F32, 1024, CLUSTER_ONE_PER_SM_SMEM),
        ] {
            let plan = RowSchedule::Auto
                .plan(&shape(16384, 131072, Some(dtype)))
                .unwrap();
            let RowPlan::Cluster {
                blocks,
                threads: t,
                smem,
                ..
            } = plan
            else {
                panic!("{plan:?}")
            };
            assert_eq!((blocks, t), (5, threads), "{dtype}");
            assert!(smem <= limit, "{smem}");
            assert!(cluster_smem(131072, 4, dtype, false).1 > limit);
        }
    }

    #[test]
    fn auto_falls_back_where_clusters_cannot_run() {
        let mixed = RowSchedule::Auto.plan(&shape(16384, 131072, None)).unwrap();
        assert_eq!(mixed, RowPlan::Fused);
        let mut ampere = shape(16384, 131072, Some(Dtype::Bf16));
        ampere.cc_major = 8;
        assert_eq!(RowSchedule::Auto.plan(&ampere).unwrap(), RowPlan::Fused);
        // Too long for 8 blocks of 220 KiB: two passes.
        let huge = RowSchedule::Auto
            .plan(&shape(16384, 1 << 20, Some(Dtype::F32)))
            .unwrap();
        assert_eq!(huge, RowPlan::Fused);
        // Few rows: split over the SMs.
        let few = RowSchedule::Auto
            .plan(&shape(8, 131072, Some(Dtype::Bf16)))
            .unwrap();
        assert!(matches!(few, RowPlan::Split(_)), "{few:?}");
    }

    #[test]
    fn many_rows_run_two_blocks_per_sm() {
        assert_eq!(fused_threads(16384, 131072, 132), 512);
        assert_eq!(fused_threads(100, 131072, 132), 1024);
        assert_eq!(fused_threads(16384, 1000, 132), 128);
    }

    #[test]
    fn forced_schedules_are_checked() {
        let s = shape(4, 1000, Some(Dtype::F16));
        assert!(RowSchedule::Cluster(9).plan(&s).is_err());
        assert!(RowSchedule::Cluster(0).plan(&s).is_err());
        assert!(RowSchedule::Cluster(2).plan(&shape(4, 1000, None)).is_err());
        assert!(RowSchedule::Split(0).plan(&s).is_err());
        assert!(RowSchedule::Split(257).plan(&s).is_err());
        assert_eq!(RowSchedule::Split(1).plan(&s).unwrap(), RowPlan::Fused);
        let big = shape(1, 1 << 20, Some(Dtype::F32));
        assert!(RowSchedule::Cluster(8).plan(&big).is_err());
        let (elems, smem) = cluster_smem(1000, 3, Dtype::F16, false);
        assert_eq!(elems, (1000 / 8usize).div_ceil(3) * 8 + 16);
        assert_eq!(smem, 4096 + 2 * (elems * 2 + 16).next_multiple_of(16));
        // JSD with a gradient: + the f32 mixture for 16-bit rows; f32 rows recompute it.
        let (_, jsd) = cluster_smem(1000, 3, Dtype::F16, true);
        assert_eq!(jsd, smem + (elems * 4 + 16).next_multiple_of(16));
        assert_eq!(
            cluster_smem(1000, 3, Dtype::F32, true),
            cluster_smem(1000, 3, Dtype::F32, false)
        );
    }

    #[test]
    fn auto_gives_jsd_room_for_its_mixture() {
        // bf16 JSD with a gradient: 8 bytes per element no longer fit two blocks per SM, so five
        // 1,024-thread blocks, one per SM; without a gradient, the KL kinds' layout.
        let mut s = shape(16384, 131072, Some(Dtype::Bf16));
        s.jsd_grad = true;
        let plan = RowSchedule::Auto.plan(&s).unwrap();
        let RowPlan::Cluster {
            blocks,
            threads,
            smem,
            ..
        } = plan
        else {
            panic!("{plan:?}")
        };
        assert_eq!((blocks, threads), (5, 1024));
        assert!(smem > CLUSTER_TWO_PER_SM_SMEM && smem <= CLUSTER_ONE_PER_SM_SMEM);
        // Longer than eight blocks can hold with the mixture: the two-pass path.
        s.vocab = 240_000;
        assert_eq!(RowSchedule::Auto.plan(&s).unwrap(), RowPlan::Fused);
        assert!(RowSchedule::Cluster(8).plan(&s).is_err());
        s.jsd_grad = false;
        assert!(RowSchedule::Cluster(8).plan(&s).is_ok());
        // A device with less shared memory per block (sm_120: 99 KiB) gets fewer bytes per block.
        s.smem_optin = 99 * 1024;
        assert!(RowSchedule::Cluster(8).plan(&s).is_err());
        s.vocab = 131072;
        let plan = RowSchedule::Auto.plan(&s).unwrap();
        assert!(
            matches!(plan, RowPlan::Cluster { smem, .. } if smem <= 99 * 1024),
            "{plan:?}"
        );
    }
}
