//! Training progress on stderr: an indicatif bar (loss, tokens/s, ETA) on a terminal, plain
//! lines otherwise (logs, CI), so that redirected output stays readable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

use distill_kernels::train::session::Progress;
use distill_kernels::train::trainer::StepStats;

pub struct Display {
    bar: Option<ProgressBar>,
    name: String,
    total: u64,
    /// Plain mode prints a line every this many steps.
    every: u64,
    last_val: Option<f64>,
}

impl Display {
    pub fn new() -> Self {
        Display {
            bar: None,
            name: String::new(),
            total: 0,
            every: 1,
            last_val: None,
        }
    }
}

impl Progress for Display {
    fn start(&mut self, name: &str, total_steps: u64, done_steps: u64) {
        self.name = name.to_string();
        self.total = total_steps;
        self.every = (total_steps / 10).max(1);
        self.last_val = None;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_steps).with_position(done_steps);
            let style =
                ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(name.to_string());
            self.bar = Some(bar);
        } else if done_steps > 0 {
            eprintln!("{name}: resuming at step {done_steps}/{total_steps}");
        }
    }

    fn step(&mut self, s: &StepStats, tokens_per_s: f64) {
        let val = self
            .last_val
            .map_or(String::new(), |v| format!(" val {v:.4}"));
        let msg = format!("loss {:.4}{val} {:.0} tok/s", s.loss, tokens_per_s);
        match &self.bar {
            Some(bar) => {
                bar.set_position(s.step);
                bar.set_message(msg);
            }
            None if s.step.is_multiple_of(self.every) || s.step == self.total => {
                eprintln!(
                    "{}: step {}/{} {msg} lr {:.2e}",
                    self.name, s.step, self.total, s.lr
                );
            }
            None => {}
        }
    }

    fn eval(&mut self, step: u64, val_loss: f64) {
        self.last_val = Some(val_loss);
        if self.bar.is_none() {
            eprintln!("{}: step {step} val_loss {val_loss:.4}", self.name);
        }
    }

    fn note(&mut self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
