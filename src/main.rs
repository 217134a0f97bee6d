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

use distill_kernels::train::files;

/// On SIGINT or SIGTERM: make every further write fail, so that a command in the middle of one
/// abandons it through its normal error path and returns (removing its temporaries, putting back
/// a run that `--force` moved aside); a command busy computing gets a grace period, then the
/// handler cleans up itself and exits. Either way the status is 128 + the signal number.
fn exit_cleanly_on_signals() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    const GRACE: std::time::Duration = std::time::Duration::from_secs(2);
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // without the handler the default action applies: nothing is cleaned up
    };
    std::thread::spawn(move || {
        let Some(sig) = signals.forever().next() else {
            return;
        };
        files::interrupt(sig);
        let started = std::time::Instant::now();
        // A second signal cuts the grace period short.
        while started.elapsed() < GRACE && signals.pending().next().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        files::run_cleanup();
        eprintln!("error: interrupted by signal {sig}; partial files were removed");
        std::process::exit(128 + sig);
    });
}

fn main() -> ExitCode {
    exit_cleanly_on_signals();
    let result = cli::run();
    if let Some(sig) = files::interrupted() {
        files::run_cleanup();
        eprintln!("error: interrupted by signal {sig}; partial files were removed");
        return ExitCode::from((128 + sig).clamp(0, 255) as u8);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}
