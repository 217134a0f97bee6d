//! `distill demo`: the crate's main job on the embedded synthetic language. Trains a teacher,
//! then two students of one smaller size for the same steps on the same data, one on hard labels
//! and one distilled from the teacher, and shows all three next to the entropy floor.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use serde_json::{json, Value};

use distill_kernels::data::corpus::Corpus;
use distill_kernels::data::entropy_floor;
use distill_kernels::data::synthetic::SyntheticLanguage;
use distill_kernels::data::tokenizer::Tokenizer;
use distill_kernels::train::checkpoint::write_atomic;
use distill_kernels::train::config::{preset, DistillConfig, TrainConfig};
use distill_kernels::train::plot::{plot_losses, Series};
use distill_kernels::train::session::{self, RunSpec, RunSummary};

use super::progress::Display;
use super::train::{load_teacher, prepare};
use super::{print_line, CliResult};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory of the three runs, metrics.json and loss_curves.png (its runs are replaced)
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Seed of the synthetic language, the initializations and the data order
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Steps of the teacher
    #[arg(long, default_value_t = DEMO_TEACHER_STEPS)]
    pub teacher_steps: u64,
    /// Steps of each student
    #[arg(long, default_value_t = DEMO_STUDENT_STEPS)]
    pub student_steps: u64,
    /// Training documents of the synthetic language
    #[arg(long, default_value_t = DEMO_TRAIN_DOCS)]
    pub train_docs: usize,
    /// Validation documents
    #[arg(long, default_value_t = DEMO_VAL_DOCS)]
    pub val_docs: usize,
    /// Where the training steps run: cpu, emulated or cuda
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Storage type of the weights and activations on emulated/cuda: f32 or bf16
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

// The demo's scale: chosen so that the whole demo finishes in under 10 minutes on 2 cores.
const DEMO_TEACHER_STEPS: u64 = 800;
const DEMO_STUDENT_STEPS: u64 = 400;
pub(crate) const DEMO_TRAIN_DOCS: usize = 4000;
pub(crate) const DEMO_VAL_DOCS: usize = 200;
const DEMO_VOCAB: usize = 512;
const DEMO_EVAL_EVERY: u64 = 25;
const TEACHER_SIZE: &str = "small";
const STUDENT_SIZE: &str = "tiny";

/// The distillation the demo's student uses.
fn demo_distill() -> DistillConfig {
    DistillConfig {
        temperature: 1.0,
        alpha: 0.9,
        ..DistillConfig::default()
    }
}

pub fn run(a: &DemoArgs) -> CliResult<()> {
    let started = Instant::now();
    let device: distill_kernels::DeviceKind = a.device.parse().map_err(super::CliError::new)?;
    let dtype: distill_kernels::train::config::DeviceDtype =
        a.dtype.parse().map_err(super::CliError::new)?;
    let lang = SyntheticLanguage::new(a.seed);
    let corpus = Corpus::synthetic(a.seed, a.train_docs, a.val_docs);
    let tok = Tokenizer::train(&corpus.train, DEMO_VOCAB)?;
    let base = TrainConfig {
        seed: a.seed,
        eval_every: DEMO_EVAL_EVERY,
        ..TrainConfig::default()
    };
    let data = prepare(&corpus, &tok, base.seq)?;
    let floor = entropy_floor(&lang, &corpus.val, &tok)?;
    eprintln!(
        "demo: synthetic language seed {}: {} training and {} validation documents, {} training tokens, vocabulary {}, entropy floor {floor:.4} nats/token",
        a.seed,
        data.train_docs,
        data.val_docs,
        data.train.tokens.len(),
        tok.vocab_size()
    );
    let meta = json!({ "data": "synthetic", "seed": a.seed });
    let train_run = |name: &str, size: &str, steps: u64, distill: Option<DistillConfig>| {
        let teacher = match &distill {
            Some(_) => Some(load_teacher(&a.out.join("teacher"))?.0),
            None => None,
        };
        let spec = RunSpec {
            name,
            out: &a.out.join(name),
            model: preset(size, tok.vocab_size(), base.seq)?,
            init_params: None,
            train: TrainConfig {
                steps,
                distill,
                ..base.clone()
            },
            teachers: teacher.into_iter().collect(),
            teacher_caches: Vec::new(),
            tokenizer: &tok,
            train_stream: &data.train,
            val_windows: &data.val,
            resume: false,
            force: true,
            stop_at: None,
            meta: meta.clone(),
            keep_checkpoints: session::DEFAULT_KEEP_CHECKPOINTS,
            data_fingerprint: None,
            allow_data_change: false,
            device,
            dtype,
        };
        CliResult::Ok(session::run(spec, &mut Display::new())?)
    };
    let teacher = train_run("teacher", TEACHER_SIZE, a.teacher_steps, None)?;
    let hard = train_run("student_hard", STUDENT_SIZE, a.student_steps, None)?;
    let kd = train_run(
        "student_kd",
        STUDENT_SIZE,
        a.student_steps,
        Some(demo_distill()),
    )?;

    let gap_closed = (hard.val_loss - kd.val_loss) / (hard.val_loss - teacher.val_loss);
    let runs = [
        ("teacher", TEACHER_SIZE, &teacher),
        ("student_hard", STUDENT_SIZE, &hard),
        ("student_kd", STUDENT_SIZE, &kd),
    ];
    print_table(&runs, floor);
    let entry = |size: &str, s: &RunSummary| -> Value {
        let mut v = s.to_json();
        v["size"] = json!(size);
        v
    };
    let metrics = json!({
        "teacher": entry(TEACHER_SIZE, &teacher),
        "student_hard": entry(STUDENT_SIZE, &hard),
        "student_kd": entry(STUDENT_SIZE, &kd),
        "entropy_floor": floor,
        "gap_closed": gap_closed,
        "distill": TrainConfig { distill: Some(demo_distill()), ..base.clone() }.to_json()["distill"],
        "seed": a.seed,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&metrics).expect("metrics are plain JSON");
    write_atomic(&a.out.join("metrics.json"), text.as_bytes())?;
    plot_demo(&a.out.join("loss_curves.png"), &runs, floor)?;
    eprintln!(
        "demo: the distilled student closes {:.0}% of the validation-loss gap between the hard-label student and the teacher ({:.1} s)",
        100.0 * gap_closed,
        started.elapsed().as_secs_f64()
    );
    print_line(
        &json!({ "entropy_floor": floor, "gap_closed": gap_closed,
        "teacher_val_loss": teacher.val_loss, "student_hard_val_loss": hard.val_loss,
        "student_kd_val_loss": kd.val_loss })
        .to_string(),
    )
}

fn print_table(runs: &[(&str, &str, &RunSummary)], floor: f64) {
    eprintln!(
        "\n{:<14} {:>6} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "run", "size", "params", "val loss", "val ppl", "tok/s", "wall s"
    );
    for (name, size, s) in runs {
        eprintln!(
            "{:<14} {:>6} {:>9} {:>9.4} {:>9.3} {:>9.0} {:>8.1}",
            name, size, s.params, s.val_loss, s.val_ppl, s.tokens_per_s, s.wall_s
        );
    }
    eprintln!(
        "{:<14} {:>6} {:>9} {:>9.4} {:>9.3}\n",
        "entropy floor",
        "",
        "",
        floor,
        floor.exp()
    );
}

/// The three validation curves and the floor. The first evaluations (loss near ln V) would
/// flatten everything that matters, so the y axis stops at twice the floor.
fn plot_demo(path: &Path, runs: &[(&str, &str, &RunSummary)], floor: f64) -> CliResult<()> {
    let colours = [[40, 40, 40], [200, 60, 40], [40, 110, 200]];
    let ceiling = 2.0 * floor;
    let series: Vec<Series> = runs
        .iter()
        .zip(colours)
        .map(|((name, _, s), rgb)| Series {
            name: format!("{name} (val)"),
            points: s
                .history
                .val
                .iter()
                .filter(|&&(_, y)| y <= ceiling)
                .map(|&(x, y)| (x as f64, y))
                .collect(),
            rgb,
            dashed: false,
        })
        .collect();
    let hlines = [("entropy floor".to_string(), floor, [120, 120, 120])];
    let title = format!("validation loss (nats/token) by step, below {ceiling:.2}");
    Ok(plot_losses(path, &title, &series, &hlines, 900, 560)?)
}
