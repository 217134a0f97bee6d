//! `distill`: run the fused distillation loss of `distill_kernels` on tensors stored in a
//! safetensors file, on any device, and write the loss and the student gradients to another one.
//!
//! ```text
//! distill loss --input IN.safetensors --output OUT.safetensors [--device cpu] [--kind jsd] ...
//! distill example --output IN.safetensors [--rows 16] [--vocab 2048] [--hidden 64] [--seed 0]
//! distill bench loss --rows N --vocab V [--dtype f32] [--kind forward-kl] [--device cpu] [--iters 10]
//! distill bench floor --rows N --vocab V [--dtype f32] [--iters 10]
//! ```
//!
//! Every failure is reported as one line `error: ...` on stderr with exit status 1 (clap's own
//! usage errors exit with 2). The program never panics on user input.

mod cli;

use std::process::ExitCode;

/// On SIGINT or SIGTERM, remove the temporaries being written (and put back a run that
/// `--force` moved aside before this run's first checkpoint), then exit as the signal would:
/// status 128 + signal number.
fn exit_cleanly_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // without the handler the default action applies: nothing is cleaned up
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            distill_kernels::train::files::run_cleanup();
            eprintln!("error: interrupted by signal {sig}; partial files were removed");
            std::process::exit(128 + sig);
        }
    });
}

fn main() -> ExitCode {
    exit_cleanly_on_signals();
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
