//! `distill bench topk`: how far the top-k loss is from the dense one on a real teacher and
//! student. Both run over validation windows; for every k and temperature the soft loss (and its
//! gradient) against the teacher's top-k rows is set next to the loss against its full logits.
//! At T = 1 the difference is what the buckets hide (the divergence inside the tail); at T != 1
//! the tail's re-tempering adds to it.

use clap::Args;
use serde_json::json;

use distill_kernels::cpu::Cpu;
use distill_kernels::data::batches::{val_windows, TokenStream};
use distill_kernels::model::Activations;
use distill_kernels::topk::TopKRows;
use distill_kernels::train::checkpoint::load_model_dir;
use distill_kernels::{
    DistillDevice, DistillInputs, GradOutputs, HostSliceMut, LossConfig, LossKind, Reduction,
    TopKInputs,
};

use super::train::{load_corpus, load_teacher};
use super::{print_line, CliError, CliResult, KindArg};

#[derive(Debug, Args)]
pub struct BenchTopKArgs {
    /// The teacher's run directory
    #[arg(long, value_name = "DIR")]
    pub teacher: std::path::PathBuf,
    /// The student's run directory (same tokenizer)
    #[arg(long, value_name = "DIR")]
    pub student: std::path::PathBuf,
    /// Text data; its validation split is used
    #[arg(long, value_name = "PATH")]
    pub data: std::path::PathBuf,
    /// Where documents end (each gets the model's EOS): `file` (one file, one document: no EOS
    /// inside running prose), `blank-lines` (every paragraph is a document) or `separator:STR`
    #[arg(long, default_value = "file", value_name = "HOW")]
    pub documents: String,
    /// Values of k
    #[arg(long, value_delimiter = ',', default_value = "8,32,128")]
    pub k: Vec<usize>,
    /// Temperatures
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub temperature: Vec<f32>,
    #[arg(long, value_enum, default_value_t = KindArg::ForwardKl)]
    pub kind: KindArg,
    /// Validation windows used (at most)
    #[arg(long, default_value_t = 16)]
    pub windows: usize,
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
}

pub fn run(a: &BenchTopKArgs) -> CliResult<()> {
    let kind = match a.kind {
        KindArg::ForwardKl => LossKind::ForwardKl,
        KindArg::ReverseKl => LossKind::ReverseKl,
        KindArg::Jsd => return Err(CliError::new("--kind jsd has no top-k loss")),
    };
    let (teacher, tok) = load_teacher(&a.teacher)?;
    let (student, s_params) = load_model_dir(&a.student)?;
    let corpus = load_corpus(&a.data, &a.documents)?;
    let val = TokenStream::encode(&corpus.val, &tok)?;
    let windows: Vec<_> = val_windows(&val, a.seq)
        .into_iter()
        .take(a.windows)
        .collect();
    if windows.is_empty() || windows[0].0.len() != a.seq {
        return Err(CliError::new(
            "the validation split is shorter than one window",
        ));
    }
    let vocab = tok.vocab_size();
    let (mut t_logits, mut s_logits) = (Vec::new(), Vec::new());
    let mut t_acts = Activations::inference(&teacher.model, 1, a.seq)?;
    let mut s_acts = Activations::inference(&student, 1, a.seq)?;
    for (inputs, _) in &windows {
        teacher
            .model
            .forward(&teacher.params, inputs, &mut t_acts)?;
        t_logits.extend_from_slice(t_acts.logits());
        student.forward(&s_params, inputs, &mut s_acts)?;
        s_logits.extend_from_slice(s_acts.logits());
    }
    let rows = windows.len() * a.seq;
    for &k in &a.k {
        let top = TopKRows::from_logits_at(t_logits[..].into(), rows, vocab, k, &a.temperature)?;
        let covered: f64 = top
            .tail
            .iter()
            .map(|&l| 1.0 - (l as f64).exp())
            .sum::<f64>()
            / rows as f64;
        for &t in &a.temperature {
            let cfg = LossConfig::builder()
                .kind(kind)
                .temperature(t)
                .alpha(1.0)
                .reduction(Reduction::Mean)
                .build()?;
            let mut g_dense = vec![0.0f32; rows * vocab];
            let dense = Cpu.distill_loss(
                &cfg,
                &DistillInputs {
                    rows,
                    vocab,
                    student: s_logits[..].into(),
                    teacher: t_logits[..].into(),
                    labels: None,
                    hidden: None,
                },
                GradOutputs {
                    logits: Some(HostSliceMut::F32(&mut g_dense)),
                    hidden: None,
                },
            )?;
            let d = dense.values[0] as f64;
            // The tail at T as the cache keeps it (exact at its temperatures), and the T = 1
            // tail tempered as a single bucket (tail / T), for comparison.
            let exact = top.tail_at(t)?;
            let naive: Vec<f32> = top.tail.iter().map(|&x| x / t).collect();
            let mut line = json!({
                "bench": "topk", "kind": kind.name(), "k": k, "temperature": t, "rows": rows,
                "vocab": vocab, "teacher_mass_in_top_k": covered, "dense_loss": d,
            });
            for (name, tail) in [("", &exact), ("bucket_tempered_", &naive)] {
                let mut g_top = vec![0.0f32; rows * vocab];
                let sparse = Cpu.distill_loss_topk(
                    &cfg,
                    &TopKInputs {
                        rows,
                        vocab,
                        student: s_logits[..].into(),
                        teacher: top.teacher_with(tail),
                        labels: None,
                    },
                    Some(HostSliceMut::F32(&mut g_top)),
                )?;
                let s = sparse.values[0] as f64;
                let dot = |x: &[f32], y: &[f32]| -> f64 {
                    x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum()
                };
                let diff: Vec<f32> = g_dense.iter().zip(&g_top).map(|(a, b)| a - b).collect();
                let norm = dot(&g_dense, &g_dense);
                line[format!("{name}topk_loss")] = json!(s);
                line[format!("{name}loss_rel_error")] = json!((s - d) / d);
                line[format!("{name}grad_rel_l2_error")] = json!((dot(&diff, &diff) / norm).sqrt());
                line[format!("{name}grad_cosine")] =
                    json!(dot(&g_dense, &g_top) / (norm * dot(&g_top, &g_top)).sqrt());
            }
            print_line(&line.to_string())?;
        }
    }
    Ok(())
}
